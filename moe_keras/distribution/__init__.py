"""Distribution: data parallelism plus experts placed across the devices of a mesh (section 3)."""
