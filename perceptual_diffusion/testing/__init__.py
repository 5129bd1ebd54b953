"""The library's conformance kit: check any backbone against the `Denoiser` contract with pytest.

    from perceptual_diffusion.testing import DenoiserConformance

    class TestMyNet(DenoiserConformance):
        input_shape = (3, 16, 16)                 # one sample
        def make_denoiser(self): return MyNet()

Needs the `test` extra (pytest; hypothesis for the eq. 13 properties, imported when they run).
"""

from .conformance import DenoiserConformance
from .probes import one_thread, randomise_zero_init, record_calls, tap_positions

__all__ = ["DenoiserConformance", "one_thread", "randomise_zero_init", "record_calls", "tap_positions"]
