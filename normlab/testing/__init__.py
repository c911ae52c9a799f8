"""Float64 reference implementations and helpers shared by the tests and the benchmarks."""
