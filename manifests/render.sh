#!/usr/bin/env bash
# Render manifests/install/amber-operator.yaml from the Helm chart: a cluster-wide install in
# namespace amber-system with the chart's default values. tests/test_chart.py fails when the
# file and the chart drift apart; run this after changing either.
set -euo pipefail
cd "$(dirname "$0")/.."
helm="${HELM:-$(bash tests/cluster/build.sh | sed -n 's/^helm=//p')}"
{
  echo "# Rendered from charts/amber-operator by manifests/render.sh: do not edit by hand."
  "$helm" template amber-operator charts/amber-operator --namespace amber-system
} > manifests/install/amber-operator.yaml
