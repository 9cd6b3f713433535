import torch

from pretraining.models.instances import instance_representation


def _two_squares() -> torch.Tensor:
    ids = torch.zeros(20, 30, dtype=torch.long)
    ids[2:8, 3:9] = 7  # 6x6 square, centre (4.5, 5.5)
    ids[10:20, 20:30] = 2  # touches the bottom-right image border
    return ids


def test_shape_dtype_and_range():
    rep = instance_representation(_two_squares())
    assert rep.shape == (3, 20, 30) and rep.dtype == torch.float32
    assert set(rep[0].unique().tolist()) <= {0.0, 1.0}
    assert rep[1:].abs().max() <= 1.0


def test_zero_where_no_instance():
    ids = _two_squares()
    rep = instance_representation(ids)
    assert (rep[:, ids == 0] == 0).all()
    assert (instance_representation(torch.zeros(8, 8, dtype=torch.long)) == 0).all()


def test_permutation_invariant_in_ids():
    ids = _two_squares()
    renumbered = torch.zeros_like(ids)
    renumbered[ids == 7] = 1
    renumbered[ids == 2] = 500
    assert torch.equal(instance_representation(ids), instance_representation(renumbered))


def test_boundaries_and_offsets_of_a_square():
    rep = instance_representation(_two_squares())
    boundary = rep[0]
    # The ring of the 6x6 square is boundary, its inside is not.
    assert boundary[2, 3:9].eq(1).all() and boundary[7, 3:9].eq(1).all() and boundary[2:8, 3].eq(1).all()
    assert boundary[3:7, 4:8].eq(0).all()
    # The image border is not a boundary (the object may continue outside the crop).
    assert boundary[19, 21:29].eq(0).all() and boundary[11:19, 29].eq(0).all()
    # Offsets point to the centre of mass, in units of the image size.
    assert torch.allclose(rep[1, 2, 3], torch.tensor((4.5 - 2) / 20))
    assert torch.allclose(rep[2, 2, 3], torch.tensor((5.5 - 3) / 30))
    assert torch.allclose(rep[1:, 2:8, 3:9].sum(dim=(1, 2)), torch.zeros(2), atol=1e-5)


def test_batched_equals_one_map_at_a_time():
    g = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 5, (3, 12, 10), generator=g)
    maps[1] = 0  # an image without instances
    batched = instance_representation(maps)
    assert batched.shape == (3, 3, 12, 10)
    for b in range(3):
        assert torch.equal(batched[b], instance_representation(maps[b]))


def test_wide_ids_take_the_renumbering_path_with_the_same_result():
    g = torch.Generator().manual_seed(1)
    maps = torch.randint(0, 5, (3, 12, 10), generator=g)
    # ids up to 36000 in a 360-pixel batch: too sparse to index bins directly, so they are renumbered.
    assert torch.equal(instance_representation(maps * 9000), instance_representation(maps))


def test_a_known_max_id_gives_the_same_result():
    g = torch.Generator().manual_seed(2)
    maps = torch.randint(0, 7, (3, 12, 10), generator=g)
    reference = instance_representation(maps)
    assert torch.equal(instance_representation(maps, max_id=6), reference)
    assert torch.equal(instance_representation(maps, max_id=2**16 - 1), reference)  # sparse: renumbered instead
