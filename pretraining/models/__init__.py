"""The networks: `factory` (named models, `create_model`) builds an `autoencoder.MaskedAutoencoder`
from `adapters`, the shared `encoder` and `decoders`; `masking` chooses visible tokens and holds the
curriculum; `instances` turns id maps into the instance input and target; `losses` scores them."""
