"""Pure-PyTorch specifications of every op: slow, obviously correct, the tests' oracle."""
