"""`make ui`: before the MLflow UI starts, the links a user wants first, each opening straight on what it names:
every task's runs table, its latest search run (the share-vs-score charts are among its artifacts), and the
registered model with its aliases.

Experiments made by an older mixtune lack the mark that makes MLflow 3 open them on their runs
(tracking.EXPERIMENT_KIND); they get it here.
"""

from __future__ import annotations

import sys

from mixtune.plumbing.tracking import EXPERIMENT_KIND as KIND
from mixtune.plumbing.tracking import tracking_uri


def links(base: str) -> list[str]:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    lines = []
    for exp in client.search_experiments(filter_string="name LIKE 'mixtune/%'"):
        if exp.tags.get(KIND[0]) != KIND[1]:
            client.set_experiment_tag(exp.experiment_id, *KIND)
        lines.append(f"{exp.name}: its runs            {base}/#/experiments/{exp.experiment_id}/runs")
        search = client.search_runs([exp.experiment_id], "tags.`mixtune.stage` = 'search'",
                                    order_by=["attributes.start_time DESC"], max_results=1)
        if search:
            lines.append(f"{exp.name}: the latest search   "
                         f"{base}/#/experiments/{exp.experiment_id}/runs/{search[0].info.run_id}/artifacts")
    for model in client.search_registered_models(filter_string="name LIKE 'mixtune-%'"):
        aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(model.aliases.items())) or "no aliases"
        lines.append(f"{model.name} ({aliases}): {base}/#/models/{model.name}")
    return lines or [f"no mixtune runs yet in {tracking_uri()}: run `make run` first"]


if __name__ == "__main__":
    print("\n".join(links(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:5000")))
