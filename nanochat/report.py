"""
The report card: one markdown file that tells what a run did and what it got.

    python -m nanochat.report reset      # at the start of a run: the header (time, git, hardware, code size)
    python -m nanochat.report generate   # at the end: report.md with every stage's section and the summary

The stages write their own sections: every pipeline script's result line (print_result) is also saved under
$NANOCHAT_BASE_DIR/report/ as <section>.json, and generate renders them. Nothing is scraped from logs.
"""

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys

from nanochat.common import Flags, UserError, get_base_dir, print_result, run_cli

# pipeline stages in report order; chat_eval gets one section per source
SECTIONS = ["tok_train", "tok_eval", "rag_index", "base_train", "base_loss", "base_eval", "mid_train", "chat_eval-mid", "chat_sft",
            "chat_eval-sft", "chat_rl", "chat_eval-rl"]
TITLES = {"tok_train": "Tokenizer training", "tok_eval": "Tokenizer evaluation", "rag_index": "Knowledge base",
          "base_train": "Base model training", "base_loss": "Base model loss", "base_eval": "Base model evaluation", "mid_train": "Midtraining",
          "chat_eval-mid": "Chat evaluation (mid)", "chat_sft": "Supervised finetuning", "chat_eval-sft": "Chat evaluation (sft)",
          "chat_rl": "Reinforcement learning", "chat_eval-rl": "Chat evaluation (rl)"}
SUMMARY_ROWS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "SyntheticMath", "ChatCORE",
                *(f"RAG-{mode}{hops}" for mode in ("closed", "context", "search") for hops in ("", " 1-hop", " multi-hop"))]
GPU_HOURLY_USD = {"H100": 3.00, "H200": 3.50, "A100": 1.79, "V100": 0.55}  # rough cloud prices per GPU-hour


def report_dir():
    path = os.path.join(get_base_dir(), "report")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # a file in the way, no permission
        raise UserError(f"{path} must be a folder for the report card ({e.strerror}): move it away or remove it") from None
    return path


def write_json(path, data, **kwargs):
    """Write by rename, so that a run killed mid-write leaves the old file or the new one, never half of one."""
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, **kwargs)
    os.replace(path + ".tmp", path)


def read_json(path):
    """A saved dict, or None and why it cannot be read (a damaged file must not cost the rest of the report)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{type(e).__name__}: {str(e)[:80]}"
    return (data, None) if isinstance(data, dict) else (None, f"a JSON {type(data).__name__}, not an object")


def section_name(result):
    stage = result["stage"]
    return f"{stage}-{result['source']}" if stage == "chat_eval" else stage


def log_result(result):
    """Called for every result line: pipeline stages keep theirs (with a timestamp) for the report."""
    name = section_name(result)
    if name in SECTIONS:
        write_json(os.path.join(report_dir(), f"{name}.json"),
                   {"timestamp": datetime.datetime.now().isoformat(timespec="seconds"), "result": result})


def _run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def code_size(root="."):
    """The bloat metric: characters, lines and files of the tracked code and docs, tokens ~ chars/4, uv.lock lines."""
    files = _run(["git", "-C", root, "ls-files", "*.py", "*.md", "*.html", "*.toml", "*.sh"]).splitlines()
    chars = lines = 0
    for name in files:
        try:
            with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        chars, lines = chars + len(text), lines + text.count("\n")
    lock = os.path.join(root, "uv.lock")
    deps = sum(1 for _ in open(lock)) if os.path.exists(lock) else 0
    return {"characters": chars, "lines": lines, "files": len(files), "tokens": chars // 4, "uv_lock_lines": deps}


def hardware():
    import psutil
    import torch
    info = {"platform": platform.platform(), "cpus_physical": psutil.cpu_count(logical=False),
            "cpus_logical": psutil.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1), "gpus": []}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["vram_gb"] = round(sum(torch.cuda.get_device_properties(i).total_memory for i in range(len(info["gpus"]))) / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def hourly_cost(gpus):
    rates = [next((r for k, r in GPU_HOURLY_USD.items() if k in name), 2.00) for name in gpus]
    return sum(rates) if rates else None


def reset():
    """Start a report: remove the old header, sections and rendering (anything else in the folder is not ours)."""
    import torch
    folder = report_dir()
    for name in ["header.json", "report.md", "curves.svg"] + [f"{section}.json" for section in SECTIONS]:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.remove(path)
    hw, size = hardware(), code_size()
    git = {"branch": _run(["git", "rev-parse", "--abbrev-ref", "HEAD"]), "commit": _run(["git", "rev-parse", "--short", "HEAD"]),
           "dirty": bool(_run(["git", "status", "--porcelain"])), "message": _run(["git", "log", "-1", "--pretty=%s"])[:80]}
    header = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "git": git, "hardware": hw,
              "hourly_cost_usd": hourly_cost(hw["gpus"]), "python": sys.version.split()[0], "torch": torch.__version__,
              "code": size}
    write_json(os.path.join(folder, "header.json"), header, indent=2)
    return header


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10000:
        return f"{value:,}"
    return str(value)


def summary_table(sections):
    """Metric rows x BASE/MID/SFT/RL columns, from the stages' own results."""
    columns = {"BASE": {}, "MID": {}, "SFT": {}, "RL": {}}
    if "base_eval" in sections:
        columns["BASE"]["CORE"] = sections["base_eval"]["core_metric"]
    for source in ("mid", "sft", "rl"):
        result = sections.get(f"chat_eval-{source}")
        if result:
            columns[source.upper()].update(result["results"])
            if result.get("chatcore") is not None:
                columns[source.upper()]["ChatCORE"] = result["chatcore"]
    rows = [r for r in SUMMARY_ROWS if any(r in c for c in columns.values())]
    lines = ["| Metric | BASE | MID | SFT | RL |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(f"{c[row]:.4f}" if row in c else "-" for c in columns.values()) + " |")
    return "\n".join(lines), columns


def curves_svg(sections, width=720, height=260):
    """Training curves as a small SVG: train loss (solid) and val bpb (dashed) per training stage, by step."""
    colors = {"base_train": "#1f77b4", "mid_train": "#ff7f0e", "chat_sft": "#2ca02c"}
    series = []
    for stage, color in colors.items():
        curve = sections.get(stage, {}).get("curve")
        if curve:
            series.append((stage, color, curve.get("train_loss", []), False))
            series.append((stage, color, curve.get("val_bpb", []), True))
    points = [p for *_, pts, _ in series for p in pts]
    if not points:
        return None
    pad, inner_w, inner_h = 40, width - 160, height - 60
    ymax = max(y for _, y in points) * 1.05
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{pad}" y1="{pad / 2 + inner_h}" x2="{pad + inner_w}" y2="{pad / 2 + inner_h}" stroke="#999"/>',
             f'<line x1="{pad}" y1="{pad / 2}" x2="{pad}" y2="{pad / 2 + inner_h}" stroke="#999"/>',
             f'<text x="4" y="{pad / 2 + 4}">{ymax:.1f}</text><text x="4" y="{pad / 2 + inner_h}">0</text>',
             f'<text x="{pad}" y="{height - 8}">each stage from its first to its last step</text>']
    for i, (stage, color, pts, dashed) in enumerate(series):
        if len(pts) < 1:
            continue
        x0, x1 = min(x for x, _ in pts), max(max(x for x, _ in pts), min(x for x, _ in pts) + 1)
        coords = " ".join(f"{pad + inner_w * (x - x0) / (x1 - x0):.1f},{pad / 2 + inner_h * (1 - y / ymax):.1f}" for x, y in pts)
        dash = ' stroke-dasharray="5,4"' if dashed else ""
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"{dash}/>')
        label = f"{stage} {'val bpb' if dashed else 'train loss'}"
        parts.append(f'<text x="{width - 150}" y="{pad / 2 + 14 * (i + 1)}" fill="{color}">{"- -" if dashed else "—"} {label}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def header_lines(header):
    hw, git, code = header["hardware"], header["git"], header["code"]
    gpus = f"{len(hw['gpus'])} x {hw['gpus'][0]} ({hw.get('vram_gb')} GB VRAM, CUDA {hw.get('cuda')})" if hw["gpus"] else "none"
    cost = f"~${header['hourly_cost_usd']:.2f}/hour" if header["hourly_cost_usd"] else "n/a (no GPU)"
    datetime.datetime.fromisoformat(header["started"])  # the wall clock time needs it
    return [f"- Run started: {header['started']}",
            f"- Git: {git['branch']} {git['commit']}{' (dirty)' if git['dirty'] else ''}: {git['message']}",
            f"- Hardware: {hw['platform']}, {hw['cpus_physical']} physical / {hw['cpus_logical']} logical CPUs, "
            f"{hw['ram_gb']} GB RAM, GPUs: {gpus}",
            f"- Hourly cost estimate: {cost}",
            f"- Python {header['python']}, PyTorch {header['torch']}",
            f"- Code: {code['characters']:,} characters, {code['lines']:,} lines, {code['files']} files, "
            f"~{code['tokens']:,} tokens; uv.lock {code['uv_lock_lines']:,} lines", ""]


def read_section(path):
    """A stage's saved (result, timestamp), or None and why not."""
    saved, problem = read_json(path)
    if saved is None:
        return None, problem
    result, stamp = saved.get("result"), saved.get("timestamp")
    try:
        datetime.datetime.fromisoformat(stamp)
    except (TypeError, ValueError):
        return None, "no valid timestamp"
    return ((result, stamp), None) if isinstance(result, dict) else (None, "no result object")


def generate(copy_to="."):
    """
    Render report.md, and copy it (with its picture) to copy_to, the working directory by default.
    A damaged header or section file (a run killed mid-write, a hand edit) costs only its own part: the report
    says which file it could not read, and the rest is rendered.
    """
    if not (os.path.isdir(copy_to) and os.access(copy_to, os.W_OK)):
        raise UserError(f"--copy-to {copy_to} is not a folder you can write: create it, or pass another")
    folder = report_dir()
    out, unreadable = ["# nanochat training report", ""], []
    header_path = os.path.join(folder, "header.json")
    header, problem = read_json(header_path) if os.path.exists(header_path) else (None, None)
    if header is not None:
        try:
            out += header_lines(header)
        except (KeyError, TypeError, ValueError, IndexError) as e:  # valid JSON, but not a header
            header, problem = None, f"{type(e).__name__}: {e}"
    if problem:
        unreadable.append(f"{header_path} ({problem})")
        out += [f"- Run details unknown: {header_path} is unreadable ({problem})", ""]
    sections, stamps = {}, {}
    for name in SECTIONS:
        path = os.path.join(folder, f"{name}.json")
        if not os.path.exists(path):
            continue
        saved, problem = read_section(path)
        out += [f"## {TITLES[name]}"]
        if saved is None:
            unreadable.append(f"{path} ({problem})")
            out += [f"{path} is unreadable ({problem}): rerun the stage to restore this section", ""]
            continue
        sections[name], stamps[name] = saved
        out += [f"timestamp: {stamps[name]}", ""]
        out += [f"- {k}: {_fmt(v)}" for k, v in sections[name].items() if k not in ("stage", "curve", "samples")]
        out.append("")
    for item in unreadable:
        print(f"note: cannot read {item}: the report goes on without it")
    table, columns = summary_table(sections)
    out += ["## Summary", "", table, ""]
    if header and stamps:
        last = max([v for k, v in stamps.items() if k not in ("chat_rl", "chat_eval-rl")] or stamps.values())
        minutes = (datetime.datetime.fromisoformat(last) - datetime.datetime.fromisoformat(header["started"])).total_seconds() / 60
        out += [f"Total wall clock time: {int(minutes // 60)}h{int(minutes % 60)}m (RL excluded)", ""]
    svg = curves_svg(sections)
    if svg:
        with open(os.path.join(folder, "curves.svg"), "w") as f:
            f.write(svg)
        shutil.copy(os.path.join(folder, "curves.svg"), os.path.join(copy_to, "report_curves.svg"))
        out += ["![training curves](report_curves.svg)", ""]
    text = "\n".join(out)
    path = os.path.join(folder, "report.md")
    with open(path, "w") as f:
        f.write(text)
    shutil.copy(path, os.path.join(copy_to, "report.md"))
    return path, columns


def main(argv=None):
    parser = Flags(description="The report card: reset at the start of a run, generate at the end.")
    parser.add_argument("command", choices=["reset", "generate"])
    parser.add_argument("--copy-to", default=".", help="generate: where to put a copy of report.md")
    args = parser.parse_args(argv)
    if args.command == "reset":
        header = reset()
        print(f"report reset in {report_dir()}")
        print_result("report", command="reset", started=header["started"], code=header["code"])
    else:
        path, columns = generate(args.copy_to)
        print(open(path).read())
        print_result("report", command="generate", report=path, copy=os.path.abspath(os.path.join(args.copy_to, "report.md")),
                     summary={k: v for k, v in columns.items() if v})


if __name__ == "__main__":
    run_cli(main)
