"""Model card and push to the Hugging Face Hub.

    wq.hub.push_to_hub("out", "me/SmolLM2-135M-W4G128", private=True)
    python -m wq.hub out me/SmolLM2-135M-W4G128 [--private] [--revision BRANCH]   (also: retry a failed push)

The card (README.md, written into the checkpoint before uploading) is built from the checkpoint itself:
wq.json (recipe, scheme, algorithm, per-layer report, eval results, which consumers load it) and
config.json. The token comes from huggingface_hub's usual places (HF_TOKEN, `hf auth login`). A failed
upload never touches the local checkpoint and the error says how to retry.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from .io import WQ_JSON

log = logging.getLogger(__name__)

CARD = "README.md"

_LOAD_HINTS = {
    "wq": ("import wq  # registers quant_method 'wq' with transformers\n"
           "from transformers import AutoModelForCausalLM\n"
           "model = AutoModelForCausalLM.from_pretrained(\"{repo}\"{sub})\n"
           "# or: model = wq.load(local_dir)"),
    "gptq": ("# pip install gptqmodel optimum\n"
             "from transformers import AutoModelForCausalLM\n"
             "model = AutoModelForCausalLM.from_pretrained(\"{repo}\"{sub}, device_map=\"auto\")"),
    "auto-round": ("# pip install auto-round\n"
                   "from transformers import AutoModelForCausalLM\n"
                   "model = AutoModelForCausalLM.from_pretrained(\"{repo}\"{sub}, device_map=\"auto\")"),
    "compressed-tensors": ("# pip install compressed-tensors\n"
                           "from transformers import AutoModelForCausalLM\n"
                           "model = AutoModelForCausalLM.from_pretrained(\"{repo}\"{sub})"),
}


class HubPushError(RuntimeError):
    """The upload failed; the local checkpoint is intact and the message says how to retry."""


# ------------------------------------------------------------------------------------------ reading


def checkpoint_dirs(path: Path) -> list[Path]:
    """The checkpoint itself, or the per-format subdirectories of a multi-format output."""
    if (path / "config.json").exists():
        return [path]
    subs = sorted(d for d in path.iterdir() if (d / "config.json").exists()) if path.is_dir() else []
    if not subs:
        raise FileNotFoundError(f"{path}: not a wq checkpoint (no config.json here or in its subfolders)")
    return subs


def _read(d: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    meta = json.loads((d / WQ_JSON).read_text()) if (d / WQ_JSON).exists() else {}
    config = json.loads((d / "config.json").read_text())
    return meta, config


def _eval_report(d: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    """Eval results: wq.json "eval", else <dir>/eval/report.json (eval.run's report)."""
    if meta.get("eval"):
        return meta["eval"]
    for f in (d / "eval" / "report.json", d.parent / "eval" / "report.json"):
        if f.exists():
            return json.loads(f.read_text())
    return None


def _size_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


# ------------------------------------------------------------------------------------------ the card


def _eval_rows(report: dict[str, Any]) -> tuple[list[str], list[tuple[str, str, Any, Any]]]:
    """(model names, rows of (metric, kind, baseline, quant)) from eval.run's report.json layout."""
    base = report.get("baseline") or {}
    quants = [k for k in report if k not in ("baseline", "deltas", "meta", "protocol")
              and isinstance(report[k], dict) and ("ppl" in report[k] or "tasks" in report[k])]
    q = report[quants[0]] if quants else {}
    rows = []
    for ds, r in (base.get("ppl") or {}).items():
        qr = (q.get("ppl") or {}).get(ds, {})
        label = f"perplexity {ds}" + (f" (seqlen {r['seqlen']})" if r.get("seqlen") else "")
        rows.append((label, "perplexity", r.get("ppl"), qr.get("ppl")))
    for task, r in (base.get("tasks") or {}).items():
        qr = (q.get("tasks") or {}).get(task, {})
        bv = r.get("acc", r) if isinstance(r, dict) else r
        qv = qr.get("acc", qr) if isinstance(qr, dict) else qr
        rows.append((f"{task} accuracy", "accuracy", bv, qv))
    return quants, rows


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else "n/a"


def model_card(path: str | os.PathLike, repo_id: str | None = None) -> str:
    """README.md text for a checkpoint directory (or a multi-format output directory)."""
    path = Path(path)
    dirs = checkpoint_dirs(path)
    meta, config = _read(dirs[0])
    recipe = meta.get("recipe") or {}
    report = meta.get("report") or {}
    base_model = recipe.get("model") or config.get("_name_or_path") or None
    if recipe and recipe.get("model") in (None, "default"):  # the CLI's bundled model
        base_model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    scheme, algo = meta.get("scheme", "?"), meta.get("algo", "?")
    repo = repo_id or path.name
    evals = _eval_report(dirs[0], meta)
    quants, rows = _eval_rows(evals) if evals else ([], [])
    methods = [json.loads((d / "config.json").read_text())["quantization_config"]["quant_method"] for d in dirs]

    front: dict[str, Any] = {
        **({"base_model": base_model} if base_model else {}),
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["wq", "quantized", scheme, algo, *dict.fromkeys(methods)],
    }
    if rows:
        metrics = [{"type": kind, "name": label, "value": round(float(qv), 4)}
                   for label, kind, _, qv in rows if isinstance(qv, (int, float))]
        if metrics:
            front["model-index"] = [{"name": repo, "results": [{
                "task": {"type": "text-generation", "name": "Text Generation"},
                "dataset": {"name": ", ".join(sorted({lbl.split()[1] for lbl, k, _, _ in rows if k == "perplexity"}))
                            or "tasks", "type": "custom"},
                "metrics": metrics}]}]

    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {repo.split('/')[-1]}", "",
             f"`{base_model or 'A model'}` quantized to **{scheme}** with **{algo}** by "
             f"wq {meta.get('versions', {}).get('wq', '')}: weight-only integer "
             "quantization, activations stay in 16-bit.", ""]

    lines += ["## Recipe", "", "| setting | value |", "|---|---|",
              f"| scheme | `{scheme}` |", f"| algorithm | `{algo}` |"]
    keys = ("skip", "override", "calib", "nsamples", "seqlen", "seed", "damp", "act_order", "block_size", "iters",
            "lr", "mse")
    calibrated = algo not in ("rtn", "?")
    for k in keys:
        if k in recipe and recipe[k] not in (None, [], False) and (calibrated or k not in (
                "calib", "nsamples", "seqlen", "damp", "act_order", "block_size", "iters", "lr")):
            lines.append(f"| {k} | `{recipe[k]}` |")
    lines += ["", "Calibration data: " + (
        f"`{recipe.get('calib') or 'the shipped Jane Austen corpus (Emma)'}`, {recipe.get('nsamples')} samples x "
        f"{recipe.get('seqlen')} tokens." if calibrated else "none (round-to-nearest needs no data)."), ""]
    if recipe:
        lines += ["Reproduce:", "", "```bash", _command(recipe, base_model), "```", ""]

    lines += ["## Size", "", "| | bytes |", "|---|---|"]
    if report.get("layers"):
        before = sum(r.get("bytes_before", 0) for r in report["layers"].values())
        after = sum(r.get("bytes_after", 0) for r in report["layers"].values())
        lines += [f"| quantized Linear weights, before | {_human(before)} |",
                  f"| quantized Linear weights, after | {_human(after)} ({after / max(before, 1):.1%}) |"]
    for d in dirs:
        lines.append(f"| checkpoint files ({d.name if len(dirs) > 1 else 'safetensors'}) | {_human(_size_bytes(d))} |")
    layers = meta.get("layers") or {}
    if layers:
        lines += ["", f"{len(layers)} Linear layers quantized; per-layer schemes and errors are in `wq.json`."]
    lines.append("")

    lines += ["## Evaluation vs BF16", ""]
    if rows:
        name = quants[0] if quants else "quantized"
        lines += [f"| metric | BF16 | {scheme} | delta |", "|---|---|---|---|"]
        for label, kind, bv, qv in rows:
            delta = (f"{(qv - bv) / bv:+.2%}" if kind == "perplexity" else f"{qv - bv:+.4f}") if isinstance(
                bv, (int, float)) and isinstance(qv, (int, float)) and bv else "n/a"
            lines.append(f"| {label} | {_fmt(bv)} | {_fmt(qv)} | {delta} |")
        proto = evals.get("protocol") or evals.get("meta")
        lines += ["", f"Measured by wq's eval in one run ({name} vs the unquantized model)"
                  + (f"; protocol: `{json.dumps(proto)}`" if proto else "") + "."]
    else:
        lines.append("Not evaluated in this run (quantize with `--eval` to add perplexity and task accuracy here).")
    lines.append("")

    lines += ["## Use it", ""]
    for d, method in zip(dirs, methods):
        sub = f', subfolder="{d.name}"' if len(dirs) > 1 else ""
        title = f"### `{d.name}/` ({method})" if len(dirs) > 1 else f"Format: `{method}`."
        lines += [title, "", "transformers:", "", "```python",
                  _LOAD_HINTS.get(method, _LOAD_HINTS["wq"]).format(repo=repo, sub=sub), "```", ""]
        dmeta, _ = _read(d)
        who = dmeta.get("consumers") or {}
        if method == "wq":
            lines += ["vLLM: wq's native format is not a vLLM format; export with `--format gptq` or "
                      "`--format compressed-tensors` to serve it there.", ""]
        elif who.get("vllm"):
            lines += [f"vLLM: **does not load this checkpoint**: {who['vllm']}.", ""]
        else:
            vsub = f"  # files under {d.name}/: download them and serve that folder" if len(dirs) > 1 else ""
            lines += ["vLLM:", "", "```bash", f"vllm serve {repo}{vsub}", "```", ""]
    versions = meta.get("versions") or {}
    if versions:
        lines += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return "\n".join(lines)


def _command(recipe: dict[str, Any], base_model: str) -> str:
    parts = ["python -m wq.quantize", recipe.get("model") or "", f"--scheme {recipe.get('scheme')}",
             f"--algo {recipe.get('algo')}"]
    for f in recipe.get("format") or []:
        parts.append(f"--format {f}")
    for p in recipe.get("skip") or []:
        if p != "lm_head":
            parts.append(f"--skip '{p}'")
    for o in recipe.get("override") or []:
        parts.append(f"--override '{o}'")
    if recipe.get("algo") not in ("rtn", None):
        for k in ("nsamples", "seqlen"):
            if recipe.get(k) is not None:
                parts.append(f"--{k} {recipe[k]}")
        if recipe.get("calib"):
            parts.append(f"--calib {recipe['calib']}")
    parts.append("-o OUT")
    return " ".join(p for p in parts if p)


def write_card(path: str | os.PathLike, repo_id: str | None = None) -> Path:
    path = Path(path)
    card = path / CARD
    card.write_text(model_card(path, repo_id))
    return card


# ------------------------------------------------------------------------------------------ push


def push_to_hub(path: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
                token: str | None = None, endpoint: str | None = None, commit_message: str | None = None) -> str:
    """Write the model card into `path`, create `repo_id` (if needed) and upload the folder. Returns its URL.

    endpoint: the Hub URL (default: huggingface_hub's, i.e. HF_ENDPOINT or huggingface.co).
    Raises HubPushError (the local checkpoint untouched, the message names the retry command).
    """
    from huggingface_hub import HfApi, constants, get_token

    path = Path(path)
    checkpoint_dirs(path)  # a checkpoint, or fail before any network call
    retry = f"python -m wq.hub {path} {repo_id}" + (" --private" if private else "") + (
        f" --revision {revision}" if revision else "")
    if constants.is_offline_mode():
        raise HubPushError(f"HF_HUB_OFFLINE is set, so nothing can be uploaded; the checkpoint is at {path}. "
                           f"Unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) and run: {retry}")
    write_card(path, repo_id)
    if token is None and get_token() is None:
        raise HubPushError(f"no Hugging Face token: run `hf auth login` or set HF_TOKEN, then: {retry} "
                           f"(the checkpoint is at {path})")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(folder_path=str(path), repo_id=repo_id, revision=revision,
                                 commit_message=commit_message or f"wq checkpoint ({path.name})")
    except Exception as e:
        raise HubPushError(f"upload of {path} to {repo_id} failed ({type(e).__name__}: {e}). The local checkpoint is "
                           f"intact; retry with: {retry}") from e
    log.info("pushed %s to %s (%s)", path, repo_id, getattr(info, "commit_url", url))
    return str(url)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m wq.hub", description="Push a wq checkpoint (with a model card) to "
                                "the Hugging Face Hub, or only write its card with --card-only.")
    p.add_argument("path", help="checkpoint directory written by wq (or a multi-format output directory)")
    p.add_argument("repo_id", nargs="?", help="Hub repo id, e.g. me/model-W4G128")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", help="branch to upload to (created if missing)")
    p.add_argument("--card-only", action="store_true", help="write README.md and stop")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.card_only or not args.repo_id:
        print(write_card(args.path, args.repo_id))
        return 0
    try:
        print(push_to_hub(args.path, args.repo_id, private=args.private, revision=args.revision))
    except HubPushError as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
