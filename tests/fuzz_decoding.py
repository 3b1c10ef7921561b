"""Fuzz cases of the decoding defaults (h15): `decode_settings.json` files read by
`load_drafter` and `generate(..., decode_settings=...)`, `TreeConfig` (fields left None to
the cost model, bad values), the tree flags of `vsd generate` / `vsd eval`
(--ranking-temperature, --decode-settings, --top-k-trees), `vsd calibrate`'s arguments,
and the VSD objective's fields (`VSDConfig`) via `TrainConfig` and `vsd train --set`.
A bad file must be named by its path, a bad argument or field by its name; a run with
None fields must decode exactly what greedy autoregressive decoding does (T = 0)."""
from __future__ import annotations

from vsd_ext.decoding import TreeConfig, generate
from vsd_ext.models import load_drafter
from vsd_ext.models.decode_settings import DecodeSettings
from vsd_ext.training.config import TrainConfig

from fuzz_core import INF, NAN, Case, World, run_cli, write_json

ACCEPTANCE = {"mode": "greedy", "temperature": 0.0, "cumulative": [[0.5, 0.7], [0.4, 0.6]],
              "reached": [10, 5]}
VALID_SETTINGS = {"format": "vsd_ext.decode_settings", "version": 1,
                  "ranking_temperature": [0.5, 0.8], "acceptance": [ACCEPTANCE], "fit": {}}
# decode_settings.json contents that must be refused (text: written as is).
SETTINGS_INVALID = {
    "garbage": "{not json", "empty": "", "binary": "\x00\xff", "list": "[1]",
    "string": '"x"', "null": "null",
    "format": {"format": "other"}, "version": {"version": 2},
    "version-text": {"version": "1"},
    "ranking-zero": {"ranking_temperature": 0}, "ranking-negative": {"ranking_temperature": -1},
    "ranking-nan": '{"ranking_temperature": NaN}',
    "ranking-inf": '{"ranking_temperature": Infinity}',
    "ranking-text": {"ranking_temperature": "x"}, "ranking-empty": {"ranking_temperature": []},
    "ranking-bad-entry": {"ranking_temperature": [1.0, 0]},
    "ranking-bool": {"ranking_temperature": True}, "ranking-null": {"ranking_temperature": None},
    "ranking-nested": {"ranking_temperature": [[1.0]]},
    "acceptance-object": {"acceptance": {}}, "acceptance-entry": {"acceptance": [5]},
    "mode": {"acceptance": [{**ACCEPTANCE, "mode": "beam"}]},
    "greedy-temperature": {"acceptance": [{**ACCEPTANCE, "temperature": 1.0}]},
    "sampled-temperature": {"acceptance": [{**ACCEPTANCE, "mode": "sampled",
                                            "temperature": 0}]},
    "temperature-nan": '{"acceptance": [{"mode": "sampled", "temperature": NaN, '
                       '"cumulative": [[0.5]]}]}',
    "cumulative-range": {"acceptance": [{**ACCEPTANCE, "cumulative": [[0.5, 1.5]]}]},
    "cumulative-negative": {"acceptance": [{**ACCEPTANCE, "cumulative": [[-0.1]]}]},
    "cumulative-decreasing": {"acceptance": [{**ACCEPTANCE, "cumulative": [[0.7, 0.5]]}]},
    "cumulative-empty": {"acceptance": [{**ACCEPTANCE, "cumulative": []}]},
    "cumulative-empty-row": {"acceptance": [{**ACCEPTANCE, "cumulative": [[]]}]},
    "cumulative-text": {"acceptance": [{**ACCEPTANCE, "cumulative": [["a"]]}]},
    "reached-length": {"acceptance": [{**ACCEPTANCE, "reached": [1]}]},
    "reached-negative": {"acceptance": [{**ACCEPTANCE, "reached": [1, -1]}]},
    "reached-float": {"acceptance": [{**ACCEPTANCE, "reached": [1.5, 2]}]},
    "fit": {"fit": [1]},
}
TREE_INVALID = {
    "depth": [0, -1, 1.5, "3", True], "topk": [0, -2, "x", False, 2.0],
    "total_tokens": [0, -1, "8", 8.5, True], "sampled": ["yes", 1, 0],
    "adaptive": ["no", 1], "ranking_temperature": [0, -1, NAN, INF, "x", (), (1.0, 0),
                                                   True, (1.0, "a"), [[1.0]]],
}
VSD_INVALID = {
    "temperature": [-1, -1e-9, NAN, INF, "x", None, True],
    "ranking_temperature": [0, -1, NAN, "x"],
    "reach": ["x", 1, None, "Expected"], "baseline": ["median", 0, None],
    "future_value": ["yes", 1, None], "anchors": [0, -1, 1.5, "x"],
    "paths": [0, 2.5, None], "depth": [0, -3, True], "tree_topk": [0, "4"],
    "tree_nodes": [0, -1, [24]], "anchor_steps": [0, -1, 1.5],
    "lambda_accept": [-1, NAN, "x"], "lambda_kl": [-0.1, INF], "lambda_tok": [-1, None],
    "lambda_tree": [-2, "x"],
}


def _settings_text(value) -> str | dict:
    if isinstance(value, dict):
        return {**VALID_SETTINGS, **value}
    return value


def settings_file_cases(world: World) -> list[Case]:
    """Bad decode_settings.json in a drafter directory (load_drafter), or given to generate:
    the error names the file."""
    cases = []
    for name, value in SETTINGS_INVALID.items():
        d = world.copy("drafter")
        path = d / "decode_settings.json"
        write_json(path, _settings_text(value))
        cases.append(Case(f"settings-drafter-{name}", lambda d=d: load_drafter(d, world.target),
                          (str(path),)))
        cases.append(Case(f"settings-generate-{name}", lambda p=path: generate(
            world.target, None, [1, 2], 2, decode_settings=p), (str(path),)))
    folder = world.copy("drafter")
    (folder / "decode_settings.json").mkdir()
    cases.append(Case("settings-drafter-directory", lambda: load_drafter(folder, world.target),
                      (str(folder / "decode_settings.json"),)))
    good = world.copy("drafter")
    write_json(good / "decode_settings.json", VALID_SETTINGS)
    cases.append(Case("settings-drafter-valid", lambda: load_drafter(
        good, world.target).decode_settings,
        check=lambda s: s is not None and s.ranking_temperatures == (0.5, 0.8)
        and s.ranking_temperature_at(5) == 0.8 and len(s.find("greedy")) == 1))
    return cases


def settings_argument_cases(world: World) -> list[Case]:
    """generate's decode_settings argument: anything but 'drafter', None, 'off', a
    DecodeSettings, a dict or a path is named; a bad dict names the argument."""
    cases = []
    for name, value in (("int", 5), ("list", [1]), ("bool", True), ("missing-file",
                        str(world.root / "no_settings.json")),
                        ("dict-bad", {"ranking_temperature": -1}), ("dict-list", {"fit": 3})):
        names = (value,) if name == "missing-file" else ("decode_settings",)
        cases.append(Case(f"settings-argument-{name}", lambda v=value: generate(
            world.target, None, [1, 2], 2, decode_settings=v), names))
    for name, value in (("ranking", 0), ("ranking-list", ())):
        cases.append(Case(f"settings-class-{name}", lambda v=value: DecodeSettings(v),
                          ("ranking_temperature",)))
    return cases


def tree_config_cases(world: World) -> list[Case]:
    """Bad TreeConfig fields are named; trees with fields left None (or oddly sized) decode
    exactly greedy autoregressive decoding at T = 0."""
    cases, drafter = [], load_drafter(world.drafter_dir, world.target)
    for field, values in TREE_INVALID.items():
        for value in values:
            cases.append(Case(f"treeconfig-{field}={value!r}", lambda f=field, v=value:
                              TreeConfig(**{f: v}), (field,)))
    for value in (5, "x", {"depth": 3}):
        cases.append(Case(f"generate-tree={value!r}", lambda v=value: generate(
            world.target, drafter, [1, 2, 3], 4, 0.0, v), ("tree",)))
    prompt, n = [1, 2, 3], 12
    greedy = generate(world.target, None, [prompt], n).tokens[0]
    trees = {"none": TreeConfig(), "depth-only": TreeConfig(depth=3),
             "topk-only": TreeConfig(topk=2), "total-only": TreeConfig(total_tokens=5),
             "sized": TreeConfig(3, 2, 4), "sized-chain-deep": TreeConfig(20, 1, 20),
             "total-past-tree": TreeConfig(2, 2, 50), "total-below-depth": TreeConfig(6, 3, 2),
             "ranking-list": TreeConfig(3, 2, 5, ranking_temperature=[0.2, 5.0]),
             "adaptive-false": TreeConfig(adaptive=False), "adaptive-sized": TreeConfig(
                 4, 2, 6, adaptive=True), "sampled-at-T0": TreeConfig(sampled=True)}
    for name, tree in trees.items():
        for settings in ("drafter", "off"):
            cases.append(Case(f"generate-greedy-{name}-{settings}", lambda t=tree, s=settings:
                              generate(world.target, drafter, [prompt], n, 0.0, t,
                                       decode_settings=s).tokens[0],
                              check=lambda out: out == greedy))
    return cases


def cli_tree_cases(world: World) -> list[Case]:
    """The tree and settings flags of `vsd generate` / `vsd eval` and `vsd calibrate`'s
    arguments: one line naming the flag or file, exit status 2."""
    t, drafter = str(world.target_dir), str(world.drafter_dir)
    garbage = world.root / "settings_garbage.json"
    garbage.write_text("{")
    bad_prompts = world.root / "prompts_garbage.jsonl"
    bad_prompts.write_text("not json\n")
    gen = ["generate", "--target", t, "--draft", drafter, "--prompt", "w1 w2",
           "--max-new-tokens", "2"]
    cal = ["calibrate", "--target", t, "--draft", drafter, "--out", str(world.root / "cal")]
    argvs = {}
    for value in ("0", "-1", "nan", "inf", "x"):
        argvs[f"gen-ranking-temperature-{value}"] = (gen + ["--ranking-temperature", value],
                                                     "--ranking-temperature")
        argvs[f"eval-ranking-temperature-{value}"] = (
            ["eval", "--target", t, "--ranking-temperature", value], "--ranking-temperature")
    argvs |= {
        "gen-decode-settings-missing": (gen + ["--decode-settings", "/nonexistent/s.json"],
                                        "/nonexistent/s.json"),
        "gen-decode-settings-garbage": (gen + ["--decode-settings", str(garbage)],
                                        str(garbage)),
        "gen-decode-settings-no-drafter": (["generate", "--target", t, "--draft", "none",
                                            "--prompt", "w1", "--decode-settings",
                                            str(garbage)], str(garbage)),
        "gen-top-k-trees-value": (gen + ["--top-k-trees=yes"], "--top-k-trees"),
        "gen-total-tokens-zero": (gen + ["--total-tokens", "0"], "--total-tokens"),
    }
    for flag, values in (("--num-prompts", ("0", "-1", "x")),
                         ("--max-new-tokens", ("0", "-1", "x")),
                         ("--temperature", ("0", "-1", "nan", "inf", "x")),
                         ("--grid", ("0", "-1", "nan", "inf", "x")),
                         ("--threads", ("-1", "x")), ("--seed", ("x",)),
                         ("--draft-dtype", ("float8",))):
        for value in values:
            argvs[f"calibrate{flag}-{value}"] = (cal + [flag, value], flag)
    argvs |= {
        "calibrate-draft-missing": (["calibrate", "--target", t, "--draft", "/nonexistent/d"],
                                    "/nonexistent/d"),
        "calibrate-no-draft": (["calibrate", "--target", t], "--draft"),
        "calibrate-prompts-missing": (cal + ["--prompts", "/nonexistent/p.jsonl"],
                                      "/nonexistent/p.jsonl"),
        "calibrate-prompts-garbage": (cal + ["--prompts", str(bad_prompts)], str(bad_prompts)),
        "calibrate-target-missing": (["calibrate", "--target", "/nonexistent/t", "--draft",
                                      drafter], "/nonexistent/t"),
    }
    return [Case(f"cli-{name}", lambda a=argv: run_cli(a), (flag,), cli=True)
            for name, (argv, flag) in argvs.items()]


def vsd_config_cases(world: World) -> list[Case]:
    """Every VSDConfig field refuses bad values, through TrainConfig and `vsd train --set`."""
    cases = []
    for field, values in VSD_INVALID.items():
        for value in values:
            cases.append(Case(f"vsdconfig-{field}={value!r}", lambda f=field, v=value:
                              TrainConfig.from_dict({"vsd": {f: v}}).validate(),
                              (f"vsd.{field}",)))
    train = ["train", "--target", str(world.target_dir), "--method", "vsd", "--max-steps", "1",
             "--seq-len", "12", "--batch-size", "2", "--no-progress", "--data", str(world.data)]
    for n, setting in enumerate(("vsd.reach=sampled", "vsd.baseline=median",
                                 "vsd.temperature=-1", "vsd.temperature=NaN",
                                 "vsd.temperature=x", "vsd.ranking_temperature=0",
                                 "vsd.anchors=0", "vsd.lambda_kl=-0.5",
                                 "vsd.future_value=2", "vsd.tree_nodes=1.5")):
        key = setting.split("=")[0]
        argv = train + ["--out", str(world.root / f"vsd_set_{n}"), "--set", setting]
        cases.append(Case(f"cli-train-set-{setting}", lambda a=argv: run_cli(a), (key,),
                          cli=True))
    return cases


BUILDERS = (settings_file_cases, settings_argument_cases, tree_config_cases, cli_tree_cases,
            vsd_config_cases)

