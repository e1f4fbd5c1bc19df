"""The command lines of train/main.py and train/toy.py do not change unnoticed:
their ``--help`` is compared with golden files, and bad flags (unknown, of the
wrong type, breaking a constraint) end in one clear error line that names the
flag, with exit status 2 and no traceback; the error lines are golden too.

All cases run in one fresh Python (the scripts import TensorFlow before they
parse), each script executed as ``__main__`` with its ``sys.argv``, as
``python train/main.py ...`` and ``python -m train.toy ...`` run it; argparse's
terminal width is pinned (``COLUMNS=100``) so the text does not depend on the
terminal.

After an intended change of a flag, its help or an error message, regenerate
the golden files and review their diff::

    REGENERATE_GOLDEN=1 python -m pytest -q -n 0 tests/test_cli_help.py
    git diff tests/data/cli/
"""

import os
import textwrap

import pytest
from helpers import REPO, run_script_result

GOLDEN = os.path.join(REPO, "tests", "data", "cli")
MAIN, TOY = "train/main.py", "train.toy"

#: (script, flags, the flag the error must name): unknown flags, values of the
#: wrong type, and values that break a declared constraint or combination.
BAD_FLAGS = (
    (MAIN, ["--bogus"], "--bogus"),
    (MAIN, ["--steps=ten"], "--steps"),
    (MAIN, ["--neumann_grad=maybe"], "--neumann_grad"),
    (MAIN, ["--dist=normal"], "--dist"),
    (MAIN, ["--lr=0"], "--lr"),
    (MAIN, ["--lr=inf"], "--lr"),
    (MAIN, ["--n_bits=9"], "--n_bits"),
    (MAIN, ["--n_blocks=-1"], "--n_blocks"),
    (TOY, ["--bogus"], "--bogus"),
    (TOY, ["--iters", "ten"], "--iters"),
    (TOY, ["--model", "glow"], "--model"),
    (TOY, ["--lr", "0"], "--lr"),
    (TOY, ["--vnorms", "2f2"], "--vnorms"),
)

_RUN_CASES = textwrap.dedent("""
    import contextlib, io, json, os, runpy, sys, traceback

    os.environ["COLUMNS"] = "100"  # argparse's width, read whenever it formats
    results = []
    for script, flags in {cases!r}:
        out, err, code = io.StringIO(), io.StringIO(), None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            sys.argv = [script] + flags
            try:
                if script.endswith(".py"):
                    runpy.run_path(script, run_name="__main__")
                else:
                    runpy.run_module(script, run_name="__main__", alter_sys=True)
            except SystemExit as e:
                code = e.code
            except BaseException:
                traceback.print_exc()
                code = "exception"
        results.append(dict(stdout=out.getvalue(), stderr=err.getvalue(), code=code))
    print("RESULT " + json.dumps(results))
""")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{(script, flags): {stdout, stderr, code}} of every case, from one subprocess.
    The bad flags of train/main.py come with an ``--out`` that must stay unused."""
    out = str(tmp_path_factory.mktemp("cli") / "run")
    cases = [(MAIN, ["--help"]), (TOY, ["--help"])] + [
        (script, flags + ([f"--out={out}"] if script == MAIN else []))
        for script, flags, _ in BAD_FLAGS
    ]
    results = run_script_result(_RUN_CASES.format(cases=cases), REPO)
    assert not os.path.exists(out), "a bad flag started a run"
    keys = [(MAIN, ()), (TOY, ())] + [(script, tuple(flags)) for script, flags, _ in BAD_FLAGS]
    return dict(zip(keys, results))


def _golden(name, text):
    """Compares ``text`` with the golden file ``name`` (or rewrites it, with
    REGENERATE_GOLDEN=1)."""
    path = os.path.join(GOLDEN, name)
    if os.environ.get("REGENERATE_GOLDEN") == "1":
        os.makedirs(GOLDEN, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        expected = f.read()
    assert text == expected, f"{name} changed; see this module's docstring to regenerate it"


@pytest.mark.parametrize("script, golden", [(MAIN, "train_main_help.txt"), (TOY, "toy_help.txt")])
def test_help_is_the_golden_text(outcomes, script, golden):
    result = outcomes[(script, ())]
    assert result["code"] in (0, None) and "Traceback" not in result["stderr"], result["stderr"]
    _golden(golden, result["stdout"])


def test_bad_flags_give_one_error_line_naming_the_flag_and_exit_2(outcomes):
    lines = []
    for script, flags, name in BAD_FLAGS:
        result = outcomes[(script, tuple(flags))]
        err = result["stderr"]
        errors = [ln for ln in err.splitlines() if "error:" in ln]
        assert result["code"] == 2 and "Traceback" not in err, (flags, err)
        assert len(errors) == 1 and name in errors[0], (flags, err)
        assert err.strip().splitlines()[-1] == errors[0], (flags, err)  # the last word
        lines.append(f"{script} {' '.join(flags)}\n    {errors[0]}\n")
    _golden("bad_flags.txt", "".join(lines))
