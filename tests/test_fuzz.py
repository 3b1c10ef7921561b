"""The hostile-input fuzz suite (issue #17): every case of tests/fuzz_cases.py — bad files
and configs, bad arguments of the API and of every `vsd` command, hostile op inputs of
the classes the ops handle — must give a correct result or a clean error that names the
argument or file. Seeded (`fuzz_cases.SEED`, or `--vsd-seed N`); about 20 s on 2 cores.
`python tests/fuzz_cases.py` prints the counts per outcome."""
import pytest

import fuzz_cases as fc

OK = ("correct", "clean error")


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    seed = request.config.getoption("--vsd-seed")
    return fc.World(tmp_path_factory.mktemp("fuzz"), fc.SEED if seed is None else seed)


@pytest.mark.parametrize("build", fc.BUILDERS, ids=lambda b: b.__name__)
def test_hostile_inputs_are_named_or_handled(world, build):
    cases = build(world)
    assert cases
    bad = [(c.name, result) for c in cases if (result := fc.outcome(c)) not in OK]
    assert not bad, f"{len(bad)} of {len(cases)} cases: {bad}"


def test_outcome_classifier():
    """The classifier itself: a silent success where an error was due, an error that names
    nothing, a wrong result and a traceback are all caught."""
    def raise_(err):
        raise err

    assert fc.outcome(fc.Case("a", lambda: 1, ("x",))) == "silently wrong"
    assert fc.outcome(fc.Case("b", lambda: raise_(ValueError("y")), ("x",))) == "unclear error"
    assert fc.outcome(fc.Case("c", lambda: raise_(TypeError("x")), ("x",))) == "unclear error"
    assert fc.outcome(fc.Case("d", lambda: raise_(ValueError("bad x")), ("x",))) == "clean error"
    assert fc.outcome(fc.Case("e", lambda: 1, check=lambda r: r == 2)) == "silently wrong"
    assert fc.outcome(fc.Case("f", lambda: raise_(KeyError(1)), ("x",), cli=True)) == "traceback"
    assert fc.outcome(fc.Case("g", lambda: (2, "vsd: x\nmore"), ("x",), cli=True)) == \
        "unclear error"
    assert fc.outcome(fc.Case("h", lambda: (0, ""), ("x",), cli=True)) == "silently wrong"


def test_debug_shows_the_traceback(world):
    """`vsd --debug ...` (anywhere on the line) raises the error itself, traceback and all."""
    argv = ["generate", "--target", "/nonexistent/target", "--prompt", "a"]
    status, err = fc.run_cli(argv)
    assert status == 2 and err.count("\n") == 1 and "/nonexistent/target" in err
    for debug in (["--debug", *argv], [*argv, "--debug"]):
        with pytest.raises(ValueError, match="/nonexistent/target"):
            fc.run_cli(debug)
