"""Private fused kernels behind the built-in losses: the same losses as their readable ``compute``
(the test oracle of every kernel), with the value and the gradient computed in closed form in a few
passes over the (n, m) distance or similarity matrix, without an autograd graph through (n, m) or
(n, k, m) intermediates. Not a public API: call the losses, not these functions.
"""
