"""The course's diagrams, drawn as SVG from this script so they can be changed and regenerated.

    python tools/diagrams.py          # writes assets/diagrams/*.svg

Each diagram is a list of boxes, arrows and labels in a fixed coordinate space; nothing is measured here.
`tools/embed_diagrams.py` copies them into the notebooks' markdown cells as attachments (shown on GitHub,
nbviewer and in JupyterLab before a kernel runs), and a test checks the notebooks hold the current files.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "assets" / "diagrams"
FONT = "font-family='Helvetica, Arial, sans-serif'"
COLORS = {"cache": "#fde2b8", "compute": "#dbe8fb", "model": "#e3f2e1", "data": "#f1f1f1", "loss": "#f8d7da",
          "note": "#ffffff"}


class Sheet:
    """A drawing: boxes with centred lines of text, arrows with optional labels, free text."""

    def __init__(self, width: int, height: int, title: str) -> None:
        self.width, self.height, self.items = width, height, []
        self.text(width / 2, 26, title, size=17, weight="bold")

    def box(self, x: float, y: float, w: float, h: float, lines: list[str] | str, kind: str = "compute",
            dashed: bool = False) -> tuple[float, float, float, float]:
        lines = [lines] if isinstance(lines, str) else lines
        dash = " stroke-dasharray='5,4'" if dashed else ""
        self.items.append(f"<rect x='{x}' y='{y}' width='{w}' height='{h}' rx='8' fill='{COLORS[kind]}' "
                          f"stroke='#555' stroke-width='1.2'{dash}/>")
        top = y + h / 2 - 8 * (len(lines) - 1)
        for i, line in enumerate(lines):
            self.text(x + w / 2, top + 16 * i + 5, line, size=13)
        return x, y, w, h

    def arrow(self, x1: float, y1: float, x2: float, y2: float, label: str = "", dy: float = -6) -> None:
        self.items.append(f"<line x1='{x1}' y1='{y1}' x2='{x2}' y2='{y2}' stroke='#333' stroke-width='1.6' "
                          f"marker-end='url(#head)'/>")
        if label:
            self.text((x1 + x2) / 2, (y1 + y2) / 2 + dy, label, size=12, color="#333")

    def chain(self, *boxes) -> None:
        """Arrows from each box to the next: left to right when the next lies to the right, else right to left."""
        for a, b in zip(boxes, boxes[1:]):
            if b[0] > a[0]:
                self.arrow(*right(a), *left(b))
            else:
                self.arrow(*left(a), *right(b))

    def text(self, x: float, y: float, s: str, size: int = 13, weight: str = "normal", color: str = "#111",
             anchor: str = "middle") -> None:
        self.items.append(f"<text x='{x}' y='{y}' {FONT} font-size='{size}' font-weight='{weight}' fill='{color}' "
                          f"text-anchor='{anchor}'>{escape(s)}</text>")

    def svg(self) -> str:
        head = ("<defs><marker id='head' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='7' markerHeight='7' "
                "orient='auto-start-reverse'><path d='M 0 0 L 10 5 L 0 10 z' fill='#333'/></marker></defs>")
        body = "\n".join(self.items)
        return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{self.width}' height='{self.height}' "
                f"viewBox='0 0 {self.width} {self.height}'>\n<rect width='100%' height='100%' fill='white'/>\n"
                f"{head}\n{body}\n</svg>\n")


def right(b) -> tuple[float, float]:
    return b[0] + b[2], b[1] + b[3] / 2


def left(b) -> tuple[float, float]:
    return b[0], b[1] + b[3] / 2


def mla() -> Sheet:
    s = Sheet(900, 420, "MLA: what is cached, and what is multiplied at every decoding step ([V2] §2.1)")
    s.text(20, 70, "naive: rebuild every cached token's keys and values, per head, at every step", anchor="start",
           weight="bold")
    c1 = s.box(20, 90, 150, 60, ["cache: c^KV, k^R", "(d_c + d_h^R) per token"], "cache")
    up = s.box(230, 90, 190, 60, ["W^UK, W^UV on all S", "latents: n_h (2 d_h) d_c each"])
    kv = s.box(480, 90, 170, 60, ["k^C, v^C per head", "(S x n_h x d_h, rebuilt)"], "data")
    at = s.box(710, 90, 170, 60, ["softmax(q k^T) v", "then W^O"])
    s.chain(c1, up, kv, at)
    s.text(20, 230, "absorbed: fold W^UK into the query and W^UV into the output, attend over the latents",
           anchor="start", weight="bold")
    q = s.box(20, 250, 150, 60, ["new token's query", "q^C W^UK_h (once)"])
    c2 = s.box(230, 330, 190, 60, ["cache: c^KV, k^R", "read as they are"], "cache")
    sc = s.box(230, 250, 190, 60, ["scores: q·c^KV + q^R·k^R", "n_h (d_c + d_h^R) per token"])
    ws = s.box(480, 250, 170, 60, ["weighted sum of c^KV", "n_h d_c per token"])
    out = s.box(710, 250, 170, 60, ["W^UV_h, then W^O", "(once per new token)"])
    s.arrow(325, 330, 325, 310)
    s.chain(q, sc, ws, out)
    s.text(450, 408, "orange: the cache. Naive per step: ~2 S n_h d_h d_c multiply-adds; absorbed: ~S n_h (2 d_c + d_h^R).",
           size=12, color="#444")
    return s


def moe_dispatch() -> Sheet:
    s = Sheet(900, 345, "MoE dispatch: sort token-slots by expert, one matmul per expert, add back (notebook 04)")
    t = s.box(20, 70, 150, 90, ["N tokens, top-K", "expert ids (N, K)", "weights g (N, K)"], "data")
    f = s.box(210, 70, 140, 90, ["flatten", "N·K slots"])
    srt = s.box(390, 70, 150, 90, ["stable sort", "by expert id", "(token order kept)"])
    s.chain(t, f, srt)
    for i, x in enumerate((580, 655, 730, 805)):
        s.box(x, 62, 65, 40, [f"E{i}" if i < 3 else "E..."], "model")
    s.text(725, 122, "contiguous segments, one per expert", size=12)
    s.arrow(*right(srt), 575, 82)
    run = s.box(560, 150, 320, 60, ["each expert runs once on its segment:", "y_seg = FFN_e(x_seg) · g_seg"])
    back = s.box(200, 240, 320, 60, ["index_add_ back into each slot's token:", "h_t = Σ_k g_{t,k} FFN_{e_k}(x_t)"])
    s.arrow(850, 102, 850, 150)
    s.arrow(*left(run), 520, 255)
    s.text(360, 325, "no per-token loop, no per-expert masks, one gather and one scatter-add", size=12, color="#444")
    return s


def bias_loop() -> Sheet:
    s = Sheet(900, 360, "Auxiliary-loss-free balancing: a bias that only selects, nudged after every step ([V3] §2.1.2)")
    sc = s.box(30, 70, 200, 70, ["affinities s_i = sigmoid(u·e_i)", "(no bias)"])
    sel = s.box(300, 70, 230, 70, ["select top-K of s_i + b_i", "within the top groups"])
    w = s.box(600, 70, 260, 70, ["weights g_i from s_i alone,", "normalized over the K chosen"])
    s.chain(sc, sel, w)
    ld = s.box(600, 220, 260, 70, ["after the optimizer step:", "load c_i = tokens routed to i"], "data")
    up = s.box(300, 220, 230, 70, ["b_i += γ · sign(mean(c) - c_i)", "overloaded down, starved up"], "loss")
    s.arrow(730, 140, 730, 220)
    s.chain(ld, up)
    s.arrow(415, 220, 415, 140, "next step", dy=0)
    s.text(450, 330, "the bias never enters the weights or the gradient: no auxiliary loss pulls against the LM loss",
           size=12, color="#444")
    return s


def grpo_loop() -> Sheet:
    s = Sheet(900, 380, "One GRPO step, as notebook 07 runs it ([Math] §4.1; [DAPO] §3.2 for the filter)")
    p = s.box(20, 70, 150, 70, ["P questions", "(fresh, no solutions)"], "data")
    g = s.box(220, 70, 190, 70, ["sample G completions each", "on the KV cache, temp 1"])
    r = s.box(460, 70, 190, 70, ["rule-based rewards:", "accuracy + 0.5 format"], "loss")
    a = s.box(700, 70, 180, 70, ["advantages per group:", "(r - mean) / std"])
    s.chain(p, g, r, a)
    f = s.box(700, 200, 180, 70, ["drop groups whose", "rewards all tie"])
    lo = s.box(440, 200, 210, 70, ["clipped surrogate on the", "kept groups' tokens"])
    u = s.box(220, 200, 170, 70, ["one optimizer step", "(no value network)"], "model")
    s.arrow(790, 140, 790, 200)
    s.chain(f, lo, u)
    s.arrow(305, 200, 305, 140, "the policy samples the next step", dy=0)
    s.text(450, 330, "the group's mean reward is the baseline; a tied group has advantage 0 and teaches nothing",
           size=12, color="#444")
    return s


def mtp_timeline() -> Sheet:
    s = Sheet(900, 360, "Self-speculative decoding with one MTP module: draft, verify, roll back ([V3] §5.4.3)")
    d = s.box(20, 80, 200, 70, ["MTP module drafts d", "from h_{n-2} and Emb(t_{n-1})"])
    v = s.box(280, 80, 240, 70, ["main model reads [t_{n-1}, d]", "in one forward on its cache"])
    s.arrow(*right(d), *left(v))
    ok = s.box(590, 40, 290, 60, ["d = its own choice for t_n: accept", "2 tokens for 1 forward"], "model")
    no = s.box(590, 140, 290, 60, ["d differs: keep its own t_n (1 token),", "crop the cache entry fed with d"],
               "loss")
    s.arrow(520, 105, 590, 70)
    s.arrow(520, 125, 590, 170)
    s.text(450, 250, "plain greedy decoding: t_n, t_{n+1}, ... one main-model forward per token", size=13)
    s.text(450, 280, "with the draft: accepted drafts skip forwards; the output is exactly the same tokens", size=13)
    s.text(450, 330, "speed-up ≈ (1 + acceptance) · c1 / (c2 + c_draft): one verify of 2 tokens plus the draft vs 1 step",
           size=12, color="#444")
    return s


def nano_deepseek() -> Sheet:
    s = Sheet(900, 470, "nano-DeepSeek: the course's decoder with DeepSeek's parts, chosen by config (notebook 08)")
    e = s.box(330, 50, 240, 40, "token embedding", "model")
    l0 = s.box(250, 120, 400, 60, ["layer 0: MLA attention (latent cache)", "+ dense SwiGLU FFN (first_k_dense_replace)"])
    l1 = s.box(250, 210, 400, 80, ["layers 1 .. L-1: MLA attention", "+ DeepSeekMoE: 1 shared expert + top-3 of 16",
                                   "routed experts (sigmoid gate, 2 of 4 groups)"])
    n = s.box(330, 320, 240, 40, "RMSNorm + LM head", "model")
    s.arrow(450, 90, 450, 120)
    s.arrow(450, 180, 450, 210)
    s.arrow(450, 290, 450, 320)
    b = s.box(690, 215, 190, 70, ["router bias b_i", "nudged after every step"], "loss")
    s.arrow(690, 250, 650, 250)
    c = s.box(20, 125, 190, 60, ["cache per token:", "c^KV + k^R, all layers"], "cache")
    s.arrow(250, 155, 210, 155)
    m = s.box(690, 320, 190, 60, ["MTP module (notebook 09)", "drafts the token after next"], "data", dashed=True)
    s.arrow(690, 350, 570, 340)
    s.text(450, 420, "the same training recipe and GRPO as the dense baseline; only the config differs", size=12,
           color="#444")
    return s


DIAGRAMS = {"mla_naive_vs_absorbed": mla, "moe_dispatch": moe_dispatch, "aux_loss_free_bias": bias_loop,
            "grpo_step": grpo_loop, "mtp_draft_verify": mtp_timeline, "nano_deepseek": nano_deepseek}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, draw in DIAGRAMS.items():
        (OUT / f"{name}.svg").write_text(draw().svg())
        print(f"wrote {OUT / f'{name}.svg'}")


if __name__ == "__main__":
    main()
