"""Put the course's diagrams (assets/diagrams/*.svg, drawn by tools/diagrams.py) into the notebooks.

    python tools/diagrams.py && python tools/embed_diagrams.py

Each diagram becomes an attachment of the markdown cell that introduces its idea, shown with
`![...](attachment:NAME.svg)`: the notebook then carries its picture wherever it is read (GitHub, nbviewer,
JupyterLab before a kernel runs). Running it again replaces the attachments with the current files.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# notebook: [(the start of the markdown cell that introduces the idea, diagram name, alt text)]
PLACES = {
    "03_mla": [("## 7. Decode speed: naive vs absorbed", "mla_naive_vs_absorbed",
                "what MLA caches, and what the naive and absorbed paths multiply at every step")],
    "04_mixture_of_experts": [("The fast form turns the $N \\cdot K$ token-slots around", "moe_dispatch",
                               "the sorted dispatch: sort slots by expert, one matmul per expert, add back")],
    "05_deepseekmoe_balancing": [("## 3. Five ways to balance the load", "aux_loss_free_bias",
                                  "the auxiliary-loss-free bias loop")],
    "07_grpo": [("## 1. The starting point", "grpo_step", "one GRPO step of the course's recipe")],
    "08_nano_deepseek": [("## 1. The model, by config alone", "nano_deepseek", "nano-DeepSeek's architecture")],
    "09_mtp_speculative": [("Now every held-out problem, one at a time", "mtp_draft_verify",
                            "self-speculative decoding: draft, verify, roll back")],
}


def embed(notebook: Path, places: list[tuple[str, str, str]]) -> None:
    nb = json.loads(notebook.read_text())
    for start, name, alt in places:
        cells = [c for c in nb["cells"] if c["cell_type"] == "markdown" and "".join(c["source"]).startswith(start)]
        if len(cells) != 1:
            raise ValueError(f"{notebook.name}: {len(cells)} markdown cells start with {start!r}; expected one.")
        cell, file = cells[0], f"{name}.svg"
        data = base64.b64encode((ROOT / "assets" / "diagrams" / file).read_bytes()).decode()
        cell.setdefault("attachments", {})[file] = {"image/svg+xml": data}
        link = f"![{alt}](attachment:{file})"
        source = "".join(cell["source"])
        if link not in source:
            lines = (source.rstrip("\n") + f"\n\n{link}").split("\n")
            cell["source"] = [line + "\n" for line in lines[:-1]] + [lines[-1]]
    notebook.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def main() -> None:
    for name, places in PLACES.items():
        embed(ROOT / "notebooks" / f"{name}.ipynb", places)
        print(f"embedded {[p[1] for p in places]} in {name}.ipynb")


if __name__ == "__main__":
    main()
