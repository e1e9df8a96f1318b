"""Plain-PyTorch launchers (differentiated by autograd), one module per kernel family."""
