"""Reports: every table, figure and interval ltcache publishes, implemented once and drawn from results.json.

- `inputs`: results.json read, validated and labelled (Result);
- `stats`: the 95% t-interval and the aggregation over inputs;
- `tables`: Markdown and CSV tables;
- `figures`: every figure, on its own Agg canvas (a notebook's backend is never switched);
- `page`: the self-contained HTML page (templates/report.html.j2, autoescaped) and `ltcache report`.

`write_reports` writes a compare's files: it writes results.json first and draws everything else from that file, read
back and validated like any input of `ltcache report`, so the two can never disagree. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ltcache.core.fsutil import atomic_write, write_json
from ltcache.report.figures import page_figures, plain_text_figures, plot_sampling_weights, save_png
from ltcache.report.inputs import Result, describe, load_results, read_results_json
from ltcache.report.page import build_report, render_page
from ltcache.report.stats import aggregate_rows, mean_interval, t_interval
from ltcache.report.tables import (
    ablation_csv,
    ablation_table,
    accuracy_table,
    curve_table,
    markdown_table,
    results_csv,
    results_markdown,
    summary_table,
)


def write_reports(folder: Path, summary: Mapping, *, ablation: list[dict] | None = None,
                  shown_as: Path | None = None) -> dict[str, str]:
    """A compare's files in `folder`: results.{json,csv,md}, every figure of its page as a PNG (per-class accuracy,
    weight norms, selection curves, reliability, shifted priors, confusions, grids), index.html, and with `ablation`
    (Comparison.ablation(): every grid point with its test scores) ablation.{json,csv,md}. Returns their paths.
    `shown_as`: where the folder will be once published (the page names that, not the staging folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "results.json", dict(summary))
    results = read_results_json(folder / "results.json")  # everything below is drawn from the file, as a report is
    paths = {name: folder / name for name in ("results.json", "results.csv", "results.md")}
    atomic_write(paths["results.csv"], lambda tmp: tmp.write_text(results_csv(results["rows"])))
    atomic_write(paths["results.md"], lambda tmp: tmp.write_text(results_markdown(results)))
    result = Result(Path(shown_as or folder).parent, results)
    result.label = describe(result)
    with plain_text_figures():  # a method or cache named m$\foo$x is a label, not mathtext
        drawn = page_figures([result], aggregate_rows([result]))
        for figure in drawn.all():
            paths[f"{figure.name}.png"] = folder / f"{figure.name}.png"
            save_png(figure, paths[f"{figure.name}.png"])
        page = render_page([result], title=f"ltcache compare: {result.label}", drawn=drawn)
    paths["index.html"] = folder / "index.html"
    atomic_write(paths["index.html"], lambda tmp: tmp.write_text(page, encoding="utf-8"))
    if ablation is not None:
        paths.update({name: folder / name for name in ("ablation.json", "ablation.csv", "ablation.md")})
        selected_on = results["selected_on"]
        write_json(paths["ablation.json"], {"selected_on": selected_on, "points": ablation})
        atomic_write(paths["ablation.csv"], lambda tmp: tmp.write_text(ablation_csv(ablation)))
        text = (f"Every grid point, fitted on train and chosen on **{selected_on}** by mean per-class accuracy; test "
                "numbers are reported after the choice and never used for it.\n\n")
        table = ablation_table(ablation, groups=results.get("groups"), selected_on=selected_on)
        atomic_write(paths["ablation.md"], lambda tmp: tmp.write_text(text + table + "\n"))
    return {name: str(path) for name, path in paths.items()}


__all__ = ["Result", "ablation_table", "accuracy_table", "aggregate_rows", "build_report", "curve_table",
           "load_results", "markdown_table", "mean_interval", "plot_sampling_weights", "read_results_json",
           "render_page", "results_csv", "results_markdown", "summary_table", "t_interval", "write_reports"]
