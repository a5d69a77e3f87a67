"""Stage (report): a finished or running study -> Pareto table, CSV, plotly HTML, bit maps, grids.

Works from the storage alone (no model needed): every trial stores the bit map it evaluated, its
cost and its tag. Weight bits show both readings (`cost` module): executed (`avg_w_bits`, the
step-weighted average) and stored (`stored_w_bits`, every distinct copy of a grouped map).
The Pareto front is optuna's `study.best_trials` (feasible trials only, i.e. within the
budget); uniform baselines and ILP priors are shown beside it for reference.

Files written to `<out>/`: `pareto.csv`, `pareto.html`, `report.json` (schema, study settings,
rows), `bitmaps/trial_<n>.json` and `grids/trial_<n>.png` per Pareto point.

Public API (implementation in private modules):

* `_rows`: `Row`, `rows`, `pareto_rows`, `reference_rows`, `best_trial`, `get_trial`,
  `trial_bitmap`, `export`, `stored_bits`, `study_weights`, `feasible` - trials as the report
  reads them;
* `_files`: `write_report`, `ReportFiles`, `write_html`, `REPORT_SCHEMA` - the report's files;
* `_figures`: `pareto_figure`, `bitmap_figure`, `heldout_figure`, `grids_figure`,
  `trial_grid`, `image_grid`, `proxy_heldout_spearman`, `score_label`, `layer_order` - plotly
  figures and sample grids;
* `_table`: `pareto_table`, `closing_tables`, `table_legend`, `table_tag` - the rows as
  terminal tables that fit 80 columns.

The dashboard (optuna-dashboard and each trial's note) is `mpq_search.dashboard`, beside this.
"""

from mpq_search.report._figures import (
    bitmap_figure,
    grids_figure,
    heldout_figure,
    image_grid,
    layer_order,
    pareto_figure,
    proxy_heldout_spearman,
    score_label,
    trial_grid,
)
from mpq_search.report._files import REPORT_SCHEMA, ReportFiles, write_html, write_report
from mpq_search.report._rows import (
    Row,
    best_trial,
    export,
    feasible,
    get_trial,
    pareto_rows,
    reference_rows,
    rows,
    stored_bits,
    study_weights,
    trial_bitmap,
)
from mpq_search.report._table import closing_tables, pareto_table, table_legend, table_tag

__all__ = [
    "REPORT_SCHEMA",
    "ReportFiles",
    "Row",
    "best_trial",
    "bitmap_figure",
    "closing_tables",
    "export",
    "feasible",
    "get_trial",
    "grids_figure",
    "heldout_figure",
    "image_grid",
    "layer_order",
    "pareto_figure",
    "pareto_rows",
    "pareto_table",
    "proxy_heldout_spearman",
    "reference_rows",
    "rows",
    "score_label",
    "stored_bits",
    "study_weights",
    "table_legend",
    "table_tag",
    "trial_bitmap",
    "trial_grid",
    "write_html",
    "write_report",
]
