"""Issue 15, item 9: every command's --help explains every option and starts without torch or diffusers; the
choices --help lists are the registries' own."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cmdistill.cli import main

COMMANDS = [[]] + [[name] for name in main.commands]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "cmdistill")
def test_help_documents_every_option_without_heavy_imports(args):
    code = ("import json, sys\nfrom cmdistill.cli import main\n"
            "try:\n    main(sys.argv[1:], prog_name='cmdistill')\nexcept SystemExit:\n    pass\n"
            "print(json.dumps({m: m in sys.modules for m in ('torch', 'diffusers', 'accelerate')}))")
    res = subprocess.run([sys.executable, "-c", code, *args, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    heavy = json.loads(res.stdout.strip().splitlines()[-1])
    assert heavy == {"torch": False, "diffusers": False, "accelerate": False}
    text = res.stdout
    cmd = main.commands[args[0]] if args else main
    for p in cmd.params:
        for opt in getattr(p, "opts", []):
            if opt.startswith("--"):
                assert opt in text, f"{opt} missing from --help"


def test_help_choices_are_the_registries():
    from cmdistill import cli
    from cmdistill.core.schedules import DEFAULT_TEACHER_SPACING, TIMESTEP_SPACINGS
    from cmdistill.core.solvers import SOLVERS
    from cmdistill.evaluation.features import feature_net_names

    assert cli.SOLVER_CHOICES == tuple(SOLVERS)
    assert cli.SPACING_CHOICES == TIMESTEP_SPACINGS and cli.DEFAULT_TEACHER_SPACING == DEFAULT_TEACHER_SPACING
    assert cli.FEATURE_NET_CHOICES == feature_net_names()
