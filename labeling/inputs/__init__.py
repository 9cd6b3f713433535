"""What a run labels: the sorted input list (`input_list`), ImageFolder trees and file lists
(`folder`), Parquet and `datasets` tables (`tables`), and the `--input` kinds told apart (`kinds`)."""
