"""Figures of the analyses (matplotlib, Agg backend): grey scales, markers and hatching, so they read in print.

Every function returns a matplotlib Figure whose `axes` follow the documented grid (tests check the grid);
`save` writes a PNG atomically.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from air_jax.atomic import atomic_save

MARKERS = ("o", "s", "^", "D", "v", "x")
LINESTYLES = ("-", "--", ":", "-.")
HATCHES = ("", "//", "..", "xx", "\\\\", "++", "oo", "--")


def _plt():
  import matplotlib

  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt

  return plt


def save(fig, path: str | os.PathLike, dpi: int = 100) -> None:
  """Writes the figure as PNG (temp file + rename) and closes it."""
  plt = _plt()
  atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
  plt.close(fig)


def attention_grid(attn: np.ndarray, layers: Sequence[int], heads: Sequence[int], *, title: str = "",
                   boundaries: Mapping[str, int] | None = None, power: float = 0.5):
  """Attention maps: rows = layers, columns = heads plus a last column with the mean over all heads.

  attn [L, H, S, S] of one caption. Grid len(layers) x (len(heads) + 1). Grey scale (darker = more attention,
  shown as A^power to make weak structure visible); dotted lines mark segment starts (`boundaries`).
  """
  plt = _plt()
  nr, nc = len(layers), len(heads) + 1
  fig, axes = plt.subplots(nr, nc, figsize=(1.6 * nc + 0.6, 1.6 * nr + 0.6), squeeze=False)
  for r, layer in enumerate(layers):
    maps = [attn[layer, h] for h in heads] + [attn[layer].mean(0)]
    for c, m in enumerate(maps):
      ax = axes[r, c]
      ax.imshow(np.power(np.clip(m, 0, 1), power), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
      for pos in (boundaries or {}).values():
        ax.axvline(pos - 0.5, color="black", lw=0.5, ls=":")
        ax.axhline(pos - 0.5, color="black", lw=0.5, ls=":")
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title("mean of heads" if c == nc - 1 else f"head {heads[c]}", fontsize=8)
      if c == 0:
        ax.set_ylabel(f"layer {layer}\nquery position", fontsize=7)
      if r == nr - 1:
        ax.set_xlabel("key position", fontsize=7)
  fig.suptitle(title or f"attention A^{power:g} (darker = more), dotted: segment starts", fontsize=9)
  return fig


def head_heatmap(values: np.ndarray, *, title: str, label: str, hal_heads: Sequence = (),
                 non_hal_heads: Sequence = (), vmin: float | None = None, vmax: float | None = None):
  """Layers x heads heatmap in grey with each cell's value printed: one axes + colour bar.

  Sensitive heads get an "S" after their value, insensitive ones an "N". Default range: symmetric around 0.
  """
  plt = _plt()
  v = np.asarray(values, np.float64)
  nl, nh = v.shape
  fig, ax = plt.subplots(figsize=(0.7 * nh + 2.0, 0.5 * nl + 1.4))
  lim = np.nanmax(np.abs(v)) if np.isfinite(v).any() else 1.0
  lo, hi = (-lim if vmin is None else vmin), (lim if vmax is None else vmax)
  im = ax.imshow(v, cmap="Greys", vmin=lo, vmax=hi, aspect="auto")
  tags = {(int(l), int(h)): " S" for l, h in hal_heads}
  tags.update({(int(l), int(h)): " N" for l, h in non_hal_heads})
  for l in range(nl):
    for h in range(nh):
      dark = np.isfinite(v[l, h]) and (v[l, h] - lo) / max(hi - lo, 1e-12) > 0.55
      ax.text(h, l, f"{v[l, h]:.2f}{tags.get((l, h), '')}", ha="center", va="center", fontsize=7,
              fontweight="bold" if (l, h) in tags else "normal", color="white" if dark else "black")
  ax.set_xlabel("head")
  ax.set_ylabel("layer")
  ax.set_xticks(range(nh))
  ax.set_yticks(range(nl))
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, label=label)
  return fig


def mai_figure(segment_mass: np.ndarray, num_tokens: np.ndarray, sensitive: np.ndarray, *, title: str = ""):
  """Two panels (1 x 2): (a) pooled MAI per generation step, sensitive vs other heads; (b) pooled MAI of each
  head (over all steps and captions), one box per group. segment_mass [B, N, L, H, 3], num_tokens [B]."""
  from air_jax.analysis.imbalance import pooled_mai

  plt = _plt()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
  steps = np.arange(segment_mass.shape[1])
  groups = [("sensitive heads", sensitive), ("other heads", ~sensitive)]
  for i, (name, sel) in enumerate(groups):
    if sel.any():
      ax1.plot(steps, pooled_mai(segment_mass, num_tokens, heads=sel), LINESTYLES[i], color="black",
               marker=MARKERS[i], markevery=max(1, len(steps) // 12), ms=4, label=name)
  ax1.set_xlabel("generation step (tokens)")
  ax1.set_ylabel("MAI = text mass / image mass")
  ax1.set_yscale("log")
  ax1.legend(fontsize=8)
  ax1.set_title("(a) MAI along the caption (pooled over captions)", fontsize=9)
  m = np.asarray(segment_mass, np.float64) * (steps[None, :] < np.asarray(num_tokens)[:, None])[..., None, None, None]
  per_head = m[..., 2].sum((0, 1)) / np.maximum(m[..., 1].sum((0, 1)), 1e-9)  # [L, H]
  data = [per_head[sel] for _, sel in groups]
  ax2.boxplot(data, medianprops={"color": "black"})
  for i, d in enumerate(data):
    ax2.plot(np.full(d.shape, i + 1.0), d, "o", color="black", mfc="none", ms=3)
  ax2.set_xticks([1, 2], [g[0] for g in groups])
  ax2.set_yscale("log")
  ax2.set_ylabel("MAI per head (pooled over steps)")
  ax2.set_title("(b) one point per head", fontsize=9)
  if title:
    fig.suptitle(title, fontsize=10)
  return fig


def rho_figure(theta: np.ndarray, curves: Mapping[str, np.ndarray], *, mc: Mapping[str, tuple] | None = None,
               extra: tuple | None = None, title: str = ""):
  """One axes: rho(theta) curves (one per label, line styles), optional Monte Carlo points (theta, rho) and
  extra curves (theta2, {label: rho}) drawn in grey (e.g. the finite-T form at the Monte Carlo's T)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for i, (name, rho) in enumerate(curves.items()):
    ax.plot(theta, rho, LINESTYLES[i % 4], color="black", lw=1.2, label=name)
  if extra is not None:
    for i, (name, rho) in enumerate(extra[1].items()):
      ax.plot(extra[0], rho, LINESTYLES[i % 4], color="grey", lw=2.0, alpha=0.8, label=name)
  for i, (name, (th, r)) in enumerate((mc or {}).items()):
    ax.plot(th, r, MARKERS[i % 6], color="black", mfc="none", ms=4, label=name)
  ax.set_xlabel("relative key position theta = i / T")
  ax.set_ylabel("propagation probability rho")
  ax.set_ylim(0, 1.02)
  ax.legend(fontsize=7)
  ax.set_title(title or "token propagation probability (eq. 7)", fontsize=9)
  return fig


def variance_entropy_figure(variance: np.ndarray, entropy: np.ndarray, sensitive: np.ndarray, *, title: str = ""):
  """One axes: per head (mean over rows) sigma_A^2 vs H(A_i); sensitive heads as filled squares."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5, 3.8))
  ax.scatter(variance[~sensitive], entropy[~sensitive], marker="o", facecolors="none", edgecolors="black",
             label="other heads")
  ax.scatter(variance[sensitive], entropy[sensitive], marker="s", color="black", label="sensitive heads")
  ax.set_xscale("log")
  ax.set_xlabel("row variance sigma_A^2 (mean over generating rows)")
  ax.set_ylabel("row entropy H(A_i) (nats)")
  ax.legend(fontsize=8)
  ax.set_title(title or "attention variance vs entropy per head", fontsize=9)
  return fig


def sensitivity_figure(curves: Mapping[str, Mapping[str, Sequence[float]]], *, defaults: Mapping[str, float] = {},
                       title: str = ""):
  """One panel per hyperparameter (1 x n grid): C_S and C_I (%) against its values, greedy as flat lines.

  curves: name -> {"values": [...], "C_S": [...], "C_I": [...], "greedy_C_S": x, "greedy_C_I": y}.
  """
  plt = _plt()
  names = list(curves)
  fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.2), squeeze=False)
  for ax, name in zip(axes[0], names):
    c = curves[name]
    x = np.asarray(c["values"], np.float64)
    ax.plot(x, c["C_S"], "-", marker="o", color="black", label="C_S (AIR)")
    ax.plot(x, c["C_I"], "--", marker="s", color="black", mfc="none", label="C_I (AIR)")
    if "greedy_C_S" in c:
      ax.axhline(c["greedy_C_S"], color="grey", ls="-", lw=0.8, label="C_S greedy")
      ax.axhline(c["greedy_C_I"], color="grey", ls="--", lw=0.8, label="C_I greedy")
    if name in defaults:
      ax.axvline(defaults[name], color="black", ls=":", lw=0.8, label="shipped value")
    ax.set_xlabel(name)
    ax.set_ylabel("CHAIR (%)")
  axes[0][0].legend(fontsize=7)
  fig.suptitle(title or "sensitivity of AIR to its hyperparameters", fontsize=10)
  fig.tight_layout()
  return fig


def cost_figure(methods: Mapping[str, Mapping[str, float]], *, model: str = "", paper: bool = True):
  """C.3: one axes, horizontal bars of seconds per caption per method (hatched) with their ratio to greedy as
  text; with `paper` and a method's paper ratio, a hollow diamond at that ratio on a secondary (top) axis that
  reads the seconds as ratios to greedy (greedy seconds = a method's caption_s / its ratio)."""
  plt = _plt()
  names = list(methods)
  secs = [float(methods[n]["caption_s"]) for n in names]
  # Greedy's seconds per caption, the scale between seconds and ratios: caption_s / ratio of the greedy row, else
  # of the first row with a positive ratio (None: no ratio axis, no diamonds).
  rows = sorted(names, key=lambda n: n != "greedy")
  g = next((float(methods[n]["caption_s"]) / float(methods[n]["ratio"]) for n in rows
            if float(methods[n]["ratio"]) > 0 and float(methods[n]["caption_s"]) > 0), None)
  diamonds = {n: float(methods[n]["paper_ratio"]) * g for n in names
              if paper and g and methods[n].get("paper_ratio") is not None}
  top = max(secs + list(diamonds.values()), default=0.0)
  fig, ax = plt.subplots(figsize=(6.5, 0.5 * len(names) + 1.4))
  y = np.arange(len(names))
  labelled = False
  for i, (n, s) in enumerate(zip(names, secs)):
    ax.barh(i, s, color="white", edgecolor="black", hatch=HATCHES[i % len(HATCHES)])
    extra = f"  x{methods[n]['ratio']:.2f}"
    pr = methods[n].get("paper_ratio")
    if paper and pr is not None:
      extra += f" (paper x{pr:.2f})"
    if n in diamonds:
      ax.plot([diamonds[n]], [i], "D", mfc="none", mec="black", ms=7, label=None if labelled else "paper's ratio")
      labelled = True
    # right of the bar and of the diamond, so the marker never covers the text
    ax.text(max(s, diamonds.get(n, 0.0) + 0.02 * top), i, f" {s:.2f} s{extra}", va="center", fontsize=8)
  ax.set_yticks(y, names)
  ax.invert_yaxis()
  ax.set_xlabel("time per caption (s)")
  ax.set_xlim(0, top * 1.6 if top > 0 else 1)
  if g:
    sec = ax.secondary_xaxis("top", functions=(lambda x: x / g, lambda r: r * g))
    sec.set_xlabel("ratio to greedy", fontsize=8)
  if labelled:
    ax.legend(fontsize=7, loc="lower right")
  ax.set_title(f"decoding cost per method{' - ' + model if model else ''} (ratio to greedy)", fontsize=9)
  return fig


__all__ = ["attention_grid", "cost_figure", "head_heatmap", "mai_figure", "rho_figure", "save", "sensitivity_figure",
           "variance_entropy_figure"]
