"""superexperts: find and measure Super Experts in Mixture-of-Experts LLMs.

The user-facing toolkit on top of the ops in `superexperts_kernels`.
"""

__version__ = "0.1.0"
