"""The kernel modules, under the names the API reference uses: ``from agent_os.modules import AMB``."""

from amb import AMB
from cmvk import CMVK
from emk import EMK
from iatp import IATP

__all__ = ["AMB", "CMVK", "EMK", "IATP"]
