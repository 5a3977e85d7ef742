"""Mesh parsing and validation (no devices needed: explicit device lists)."""

import gin
import pytest

from moe_keras.distribution import mesh as mesh_lib

DEVICES = [f"/device:CPU:{i}" for i in range(8)]


@pytest.mark.parametrize(
    "text, want",
    [
        ("batch:2,expert:4", {"batch": 2, "expert": 4}),
        ("expert:4, batch:2", {"batch": 2, "expert": 4}),
        ("expert:8", {"batch": 1, "expert": 8}),
        ("batch:8", {"batch": 8, "expert": 1}),
        ({"expert": 2}, {"batch": 1, "expert": 2}),
    ],
)
def test_parse(text, want):
  assert mesh_lib.parse_mesh_shape(text) == want


@pytest.mark.parametrize(
    "text, message",
    [
        ("batch=2,expert:4", "is not 'axis:size'"),
        ("batch:2,,expert:4", "is not 'axis:size'"),
        ("batch:two", "is not 'axis:size'"),
        ("batch:-1", "is not 'axis:size'"),
        ("batch:0,expert:4", "size >= 1"),
        ("model:2", "unknown mesh axis 'model'"),
        ("batch:2,batch:4", "repeated"),
        ("", "must be a string"),
        (None, "must be a string"),
    ],
)
def test_parse_errors_are_one_line(text, message):
  with pytest.raises(ValueError, match=message) as info:
    mesh_lib.parse_mesh_shape(text)
  assert "\n" not in str(info.value)


def test_device_layout_is_row_major():
  mesh = mesh_lib.Mesh("batch:2,expert:4", devices=DEVICES)
  assert mesh.device(1, 2) == DEVICES[6]
  assert mesh.expert_devices(0) == DEVICES[:4]
  assert mesh.expert_devices(1) == DEVICES[4:]
  assert mesh.spec == "batch:2,expert:4"


def test_device_count_must_match():
  with pytest.raises(ValueError, match="needs 6 devices but 8") as info:
    mesh_lib.Mesh("batch:2,expert:3", devices=DEVICES)
  assert "\n" not in str(info.value)
  # A 1x1 mesh is a single device on any machine.
  assert mesh_lib.Mesh("batch:1", devices=DEVICES).devices == DEVICES[:1]


def test_num_experts_must_divide():
  mesh = mesh_lib.Mesh("batch:2,expert:4", devices=DEVICES)
  mesh.check_num_experts(8)
  mesh.check_num_experts(16, group_size=4)  # 4 groups on 4 devices
  with pytest.raises(ValueError, match="num_experts=6 is not divisible"):
    mesh.check_num_experts(6)
  with pytest.raises(ValueError, match="num_groups=2 is not divisible"):
    mesh.check_num_experts(8, group_size=4)  # a group may not be split


def test_gin_binding():
  with gin.unlock_config():
    gin.parse_config("configured_mesh_shape.mesh_shape = 'batch:2,expert:4'")
  try:
    assert mesh_lib.configured_mesh_shape() == "batch:2,expert:4"
  finally:
    gin.clear_config()
