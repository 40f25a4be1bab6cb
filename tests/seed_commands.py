"""The command lines of the seed README (tests/data/seed_vlm_connectors_README.txt), read from the file itself.

``seed_commands()`` returns every ``python …`` / ``sbatch …`` line of the README's code blocks (backslash
continuations joined) with the section it appears in; ``localize()`` maps one onto a throwaway run: the
seed's relative paths stay relative (the test runs in a temp folder laid out like the seed's repo), its
published model ids become offline tiny models and ``--device cuda`` becomes ``cpu``.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

SEED_README = Path(__file__).parent / "data" / "seed_vlm_connectors_README.txt"

# the seed's published ids → offline stand-ins (no model hub in tests)
MODEL_IDS = {"openai/clip-vit-large-patch14": "tiny-clip"}
DEVICE = {"cuda": "cpu"}


@dataclass(frozen=True)
class SeedCommand:
    """One command line of the seed README.

    Attributes:
        section: the heading it appears under (``Quick Start With Sample Outputs``, ``4. Train Reconstructors``).
        argv: the command split like a shell would (``["python", "src/train/train_recon.py", ...]``).
    """

    section: str
    argv: tuple[str, ...]

    @property
    def script(self) -> str:
        return self.argv[1]

    def __str__(self) -> str:
        return " ".join(self.argv)


def seed_commands(path: Path = SEED_README) -> list[SeedCommand]:
    """Every ``python``/``sbatch`` command line of the README, in order, with its section heading."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[SeedCommand] = []
    section = ""
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if re.match(r"^(\d+\. |Quick Start|Full Pipeline|Setup)", line):
            section = line
        if re.match(r"^(python|sbatch) \S", line) and not line.startswith("python -m"):
            text = line
            while text.endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text[:-1].rstrip() + " " + lines[i].strip()
            out.append(SeedCommand(section, tuple(shlex.split(text))))
        i += 1
    return out


def localize(argv: tuple[str, ...], tiny_vlms: bool = True) -> list[str]:
    """The seed's argv for an offline CPU run: published ids → tiny models, ``--device cuda`` → cpu.

    Stage 1 names no weights in the seed (its published checkpoints are the default): ``--model-path tiny``
    is added there. Paths are untouched (the caller runs the command in a folder laid out like the seed's).
    """
    args = list(argv)
    for j, a in enumerate(args[:-1]):
        if a == "--model_id":
            args[j + 1] = MODEL_IDS.get(args[j + 1], args[j + 1])
        if a == "--device":
            args[j + 1] = DEVICE.get(args[j + 1], args[j + 1])
    if tiny_vlms and args[1].endswith("extract_vectors.py"):
        args += ["--model-path", "tiny"]
    return args
