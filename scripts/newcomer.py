"""A newcomer's first hour, replayed: a fresh clone, a fresh venv, README's two commands, then the failure cases of
issue 20, each with its outcome, exit code, time and the load average. Standard library only (it runs before the
venv exists).

    python3 scripts/newcomer.py --repo /work/main --out docs/newcomer.md
    python3 scripts/newcomer.py --repo . --skip-tests --keep /tmp/newcomer   # faster; keep the work directory

Each case states what a careful tool does (the expectation) and what happened; the report is Markdown with the
exact commands. A fresh WQ_CACHE is used (the bundled model is converted from its GGUF again and the CPU kernels
compile again, as on a new machine); the Austen corpus is taken from an existing copy when there is one
(WQ_JANEAUSTENR), since fetching it needs apt.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Case:
    name: str
    command: str
    expect: str
    rc: int | None = None
    seconds: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)
    ok: bool = False
    detail: str = ""
    tail: list[str] = field(default_factory=list)


def load1() -> float:
    return round(os.getloadavg()[0], 2)


class Runner:
    def __init__(self, work: Path, env: dict[str, str]):
        self.work, self.env, self.cases = work, env, []

    def sh(self, cmd: str, cwd: Path | None = None, timeout: int = 3600) -> tuple[int, str, float]:
        t = time.perf_counter()
        p = subprocess.run(["bash", "-c", cmd], cwd=cwd or self.work / "clone", env=self.env, capture_output=True,
                           text=True, timeout=timeout)
        return p.returncode, (p.stdout + p.stderr), time.perf_counter() - t

    def case(self, name: str, cmd: str, expect: str, check, cwd: Path | None = None, timeout: int = 3600,
             setup: str | None = None) -> Case:
        if setup:
            self.sh(setup, cwd=self.work)
        c = Case(name, cmd, expect)
        l0 = load1()
        try:
            c.rc, out, c.seconds = self.sh(cmd, cwd=cwd, timeout=timeout)
        except subprocess.TimeoutExpired:
            c.rc, out, c.seconds = None, f"timed out after {timeout} s", float(timeout)
        c.load = (l0, load1())
        lines = [x for x in out.replace("\r", "\n").splitlines() if x.strip() and "it/s]" not in x]
        c.tail = lines[-6:]
        try:
            c.ok, c.detail = check(c.rc, out, c.seconds)
        except Exception as e:  # a check that raised is a failed expectation
            c.ok, c.detail = False, f"check raised {type(e).__name__}: {e}"
        self.cases.append(c)
        print(f"[{'PASS' if c.ok else 'FAIL'}] {name}: rc={c.rc} {c.seconds:.1f}s load {c.load} {c.detail}", flush=True)
        return c


def one_error_line(out: str) -> str:
    return next((x for x in out.splitlines() if x.startswith("error:")), "")


def error_check(*needles: str, max_seconds: float | None = None, rc: int = 2):
    def check(code, out, secs):
        line = one_error_line(out)
        ok = code == rc and "Traceback" not in out and all(n in out for n in needles)
        if max_seconds is not None and secs > max_seconds:
            ok = False
        return ok, line[:300]
    return check


def main() -> int:
    p = argparse.ArgumentParser(prog="python3 scripts/newcomer.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]), help="what to git clone")
    p.add_argument("--out", default=None, help="write the Markdown report here (default: print it)")
    p.add_argument("--keep", default=None, help="work directory to keep (default: a temporary one, removed)")
    p.add_argument("--skip-tests", action="store_true", help="skip README's test command (the longest step)")
    p.add_argument("--python", default=sys.executable, help="the Python that makes the venv (3.11)")
    args = p.parse_args()

    work = Path(args.keep or tempfile.mkdtemp(prefix="wq-newcomer-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WQ_", "PYTHONPATH", "VIRTUAL_ENV", "OMP_"))}
    env["WQ_CACHE"] = str(work / "wq-cache")
    corpus = Path(os.environ.get("WQ_CACHE") or Path.home() / ".cache" / "wq") / "janeaustenr"
    if corpus.exists():
        env["WQ_JANEAUSTENR"] = str(corpus)
    venv = work / "venv"
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    env["VIRTUAL_ENV"] = str(venv)
    r = Runner(work, env)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t_all = time.perf_counter()

    # ---------------------------------------------------------------- install: fresh clone, fresh venv
    r.case("fresh clone", f"git clone -q {shlex.quote(args.repo)} {work / 'clone'} && git -C {work / 'clone'} log --oneline -1",
           "the repository clones", lambda c, o, s: (c == 0, o.strip()[:120]), cwd=work)
    r.case("fresh venv", f"{shlex.quote(args.python)} -m venv {venv} && python --version",
           "a Python 3.11 venv", lambda c, o, s: (c == 0 and "3.11" in o, o.strip()), cwd=work)
    readme1 = "bash scripts/setup.sh && python -m wq.quantize --scheme W4G128 -o out/smollm2-w4g128"
    r.case("README command 1 (setup + quantize the bundled model)", readme1,
           "installs, converts the bundled model once, writes out/smollm2-w4g128 with a summary",
           lambda c, o, s: (c == 0 and "layers quantized" in o, next((x for x in o.splitlines() if "total time" in x), "")))
    if not args.skip_tests:
        r.case("README command 2 (setup + fast tests)", 'bash scripts/setup.sh && python -m pytest -m "not slow" -q -p no:cacheprovider',
               "the fast suite passes (target: under 8 minutes unloaded)",
               lambda c, o, s: (c == 0, next((x for x in reversed(o.splitlines()) if " passed" in x), "")[:200]),
               timeout=7200)

    # ---------------------------------------------------------------- the output never endangers data
    q = "python -m wq.quantize --no-progress"
    sand = work / "sandbox"
    r.case("-o . --overwrite in a directory holding a file", f"{q} --scheme W4G128 -o . --overwrite",
           "exit 2 before loading the model; canary.txt kept",
           lambda c, o, s: (c == 2 and (sand / "canary.txt").read_text() == "mine\n" and "Traceback" not in o,
                            one_error_line(o)), cwd=sand, setup=f"mkdir -p {sand} && echo mine > {sand}/canary.txt")
    r.case("-o DIR --overwrite on a directory wq did not write", f"{q} --scheme W4G128 -o photos --overwrite",
           "exit 2, names --overwrite-non-checkpoint; photos/a.jpg kept",
           lambda c, o, s: (c == 2 and (sand / "photos" / "a.jpg").exists() and "--overwrite-non-checkpoint" in o,
                            one_error_line(o)), cwd=sand, setup=f"mkdir -p {sand}/photos && echo x > {sand}/photos/a.jpg")
    r.case("output parent is a file", f"{q} --scheme W4G128 -o canary.txt/out",
           "exit 2 before loading", error_check("is a file, not a directory", max_seconds=60), cwd=sand)
    ro = work / "readonly"
    ro.mkdir(exist_ok=True)
    mounted_ro = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,ro", "tmpfs", str(ro)],
                                capture_output=True).returncode == 0
    if not mounted_ro:
        os.chmod(ro, 0o555)
    r.case(f"read-only output location ({'read-only tmpfs' if mounted_ro else 'chmod 555'})",
           f"{q} --scheme W4G128 -o {ro}/out", "exit 2 before loading the model",
           error_check("cannot write in", max_seconds=60))
    small = work / "small"
    small.mkdir(exist_ok=True)
    mounted_small = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(small)],
                                   capture_output=True).returncode == 0
    if mounted_small:
        r.case("full disk (tmpfs of 40 MB for a ~117 MB checkpoint)", f"{q} --scheme W4G128 -o {small}/out",
               "exit 2 before loading the model, with the estimated size", error_check("not enough space", max_seconds=60))
    ck = "out/smollm2-w4g128"
    r.case("--overwrite of a checkpoint swaps the new one in", f"{q} --scheme W8G-1 -o {ck} --overwrite",
           "exit 0; the old checkpoint is replaced, nothing left beside it",
           lambda c, o, s: (c == 0 and json.loads((work / "clone" / ck / "wq.json").read_text())["scheme"] == "W8G-1"
                            and not [x for x in (work / "clone" / "out").iterdir() if x.name.startswith(".")], ""))

    # ---------------------------------------------------------------- every failure before the work
    model_dir = work / "model-copy"
    cache_model = Path(env["WQ_CACHE"]) / "SmolLM2-135M-Instruct-bf16"
    r.case("truncated safetensors shard", f"{q} {model_dir} --scheme W4G128 -o out/trunc",
           "exit 2 before loading, naming the file and 'truncated'",
           error_check("model.safetensors is truncated", max_seconds=60),
           setup=f"rm -rf {model_dir} && cp -r {cache_model} {model_dir} && truncate -s -1000 {model_dir}/model.safetensors")
    notok = work / "model-no-tokenizer"
    setup_notok = (f"rm -rf {notok} && mkdir -p {notok} && cp {cache_model}/config.json {cache_model}/model.safetensors "
                   f"{cache_model}/generation_config.json {notok}/")
    r.case("model without tokenizer files, rtn", f"{q} {notok} --scheme W4G128 -o out/notok",
           "exit 0: rtn needs no tokenizer; the checkpoint has none",
           lambda c, o, s: (c == 0 and not (work / "clone" / "out" / "notok" / "tokenizer.json").exists(),
                            next((x for x in o.splitlines() if "total time" in x), "").strip()), setup=setup_notok)
    r.case("model without tokenizer files, gptq", f"{q} {notok} --scheme W4G128 --algo gptq -o out/notok-gptq",
           "exit 2 before loading, one line naming the tokenizer", error_check("no tokenizer files", max_seconds=60))
    r.case("made-up Hub id (no network)", f"{q} someone/made-up-model --scheme W4G128 -o out/x",
           "exit 2 within seconds, one line, no retry warnings",
           lambda c, o, s: (c == 2 and s < 30 and "Retrying" not in o and o.count("WARNING") == 0, one_error_line(o)))
    r.case("mistyped local directory without ./", f"{q} out/smollm2-w4g12 --scheme W4G128 -o out/x",
           "exit 2 at once: a missing local path, with the close match",
           error_check("no such local directory", "did you mean", max_seconds=30))
    partial = "out/resume"
    # set -m: job control, else a non-interactive shell starts background jobs with SIGINT ignored
    start = (f"set -m; {q} --scheme W4G128 --algo gptq --nsamples 8 --seqlen 128 -o {partial} & pid=$!; "
             f"while [ ! -f {partial}.partial/state.json ]; do sleep 1; kill -0 $pid 2>/dev/null || break; done; "
             f"kill -INT $pid; wait $pid; echo rc=$?")
    r.case("Ctrl-C during a calibrated run", start,
           "exit 130 with the resume directory's path and size", lambda c, o, s: ("rc=130" in o and ".partial" in o,
                                                                                 next((x for x in o.splitlines() if x.startswith("interrupted")), "")))
    r.case("--resume with other settings", f"{q} --scheme W4G128 --algo gptq --nsamples 8 --seqlen 128 -o {partial} "
           "--resume --damp 0.05", "exit 2, one line naming --damp (not internal field names)",
           error_check("--damp (0.01 then, 0.05 now)"))

    # ---------------------------------------------------------------- consumers from real shapes
    odd = work / "odd-model"
    make_odd = (f"python -c \"from transformers import LlamaConfig, LlamaForCausalLM; LlamaForCausalLM(LlamaConfig("
                f"hidden_size=100, intermediate_size=200, num_hidden_layers=2, num_attention_heads=5, "
                f"num_key_value_heads=1, vocab_size=256)).save_pretrained('{odd}')\"")
    r.case("W3G128 on in_features=100: the hint", f"{q} {odd} --scheme W3G128 -o out/odd-w3",
           "the warning names the real shapes and suggests G-1 (no hard-coded 576)",
           lambda c, o, s: (c == 0 and "no group size divides them" in o and "576" not in o,
                            next((x for x in o.splitlines() if "NOT load" in x), "")[:250]), setup=make_odd)
    r.case("gptq export of that model at W4G128: consumers", f"{q} {odd} --scheme W4G128 --format gptq -o out/odd-gptq "
           f"&& python -c \"import json; print(json.load(open('out/odd-gptq/wq.json'))['consumers'])\"",
           "wq.json records that vLLM cannot load it", lambda c, o, s: (c == 0 and "'vllm': '" in o,
                                                                     next((x for x in o.splitlines() if "'vllm'" in x),
                                                                          "")[:300]))

    # ---------------------------------------------------------------- speed a newcomer feels
    r.case("first gptq run: the kernel build says so", f"{q} --scheme W4G128 --algo gptq --nsamples 8 --seqlen 128 -o out/g",
           "'compiling CPU kernels (once' appears once per machine (or the cached build is reused)",
           lambda c, o, s: (c == 0, ("compiled now" if "compiling CPU kernels (once" in o else "reused the cached build")
                            + "; " + next((x for x in o.splitlines() if "output error" in x), "").strip()))
    r.case("wq.generate on the W4G128 checkpoint", "python -m wq.generate out/g --tokens 32",
           "prints both models' tokens/s, the threads and the load average",
           lambda c, o, s: (c == 0 and "load average" in o,
                            " | ".join(x.strip() for x in o.splitlines() if "tokens/s" in x or "thread(s)" in x)[:400]))
    r.case("the issue's small eval", "python -m wq.quantize --no-progress --scheme W3G128 -o out/w3 >/dev/null && "
           "python -m eval.run --baseline default --quant out/g --quant out/w3 --ppl austen --seqlen 256 --windows 8 "
           "--tasks austen --limit 20", "a report in minutes, models named by directory and algorithm",
           lambda c, o, s: (c == 0 and "(gptq)" in o and "(rtn)" in o, f"{s / 60:.1f} min"), timeout=7200)

    for d in (ro, small):
        subprocess.run(["umount", str(d)], capture_output=True)
    total = time.perf_counter() - t_all
    report = render(r.cases, args, started, total)
    if args.out:
        Path(args.out).write_text(report)
    print(report)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(c.ok for c in r.cases) else 1


def render(cases: list[Case], args, started: str, total: float) -> str:
    n_ok = sum(c.ok for c in cases)
    lines = [
        "# A newcomer's first hour, replayed",
        "",
        f"`python3 scripts/newcomer.py --repo {args.repo}{' --skip-tests' if args.skip_tests else ''}` "
        f"started {started}, took {total / 60:.1f} min; {n_ok}/{len(cases)} cases as expected. Machine: "
        f"{os.cpu_count()} CPUs, shared with other processes: each row states the 1-minute load average before "
        "and after it (times scale with it).",
        "",
        "| case | expected | outcome | exit | seconds | load before/after |",
        "|---|---|---|---|---|---|",
    ]
    for c in cases:
        detail = c.detail.replace("|", "\\|")
        lines.append(f"| {c.name} | {c.expect} | {'as expected' if c.ok else '**NOT as expected**'}: {detail} | "
                     f"{c.rc} | {c.seconds:.1f} | {c.load[0]} / {c.load[1]} |")
    lines += ["", "## Commands and last lines", ""]
    for c in cases:
        lines += [f"### {c.name}", "", "```", f"$ {c.command}", *c.tail, "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
