#!/usr/bin/env bash
# Re-fetch the vendored Vega bundles from the npm registry (nothing is fetched when the plots are rendered):
#   plots/vendor/fetch.sh
# Same majors as the CDN scripts dvc-render 1.0.2 writes (vega@5.20.2, vega-lite@5.2.0, vega-embed@6.18.2), latest
# releases of those majors; the specs DVC emits use the vega-lite v5 schema. To update: edit the versions, rerun,
# check the LICENSE files and `git diff plots/vendor/SHA256SUMS`.
set -euo pipefail
VEGA=5.33.1
VEGA_LITE=5.23.0
VEGA_EMBED=6.29.0
# vega's own tarball ships no LICENSE: take the identical monorepo one from vega-view, the version vega@$VEGA pins.
VEGA_VIEW=5.16.1

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
npm pack --silent "vega@$VEGA" "vega-lite@$VEGA_LITE" "vega-embed@$VEGA_EMBED" "vega-view@$VEGA_VIEW" >/dev/null
for pkg in "vega-$VEGA" "vega-lite-$VEGA_LITE" "vega-embed-$VEGA_EMBED" "vega-view-$VEGA_VIEW"; do
  mkdir "$pkg" && tar -xzf "$pkg.tgz" -C "$pkg"
done
cp "vega-$VEGA/package/build/vega.min.js" "$here/vega.min.js"
cp "vega-lite-$VEGA_LITE/package/build/vega-lite.min.js" "$here/vega-lite.min.js"
cp "vega-embed-$VEGA_EMBED/package/build/vega-embed.min.js" "$here/vega-embed.min.js"
cp "vega-view-$VEGA_VIEW/package/LICENSE" "$here/LICENSE.vega"
cp "vega-lite-$VEGA_LITE/package/LICENSE" "$here/LICENSE.vega-lite"
cp "vega-embed-$VEGA_EMBED/package/LICENSE" "$here/LICENSE.vega-embed"
for pkg in "vega-$VEGA" "vega-lite-$VEGA_LITE" "vega-embed-$VEGA_EMBED"; do
  license="$(node -p 'require(process.argv[1]).license' "$tmp/$pkg/package/package.json")"
  [ "$license" = BSD-3-Clause ] || { echo "$pkg: license $license, expected BSD-3-Clause: review before vendoring" >&2; exit 1; }
done
cd "$here"
{
  echo "# vega@$VEGA vega-lite@$VEGA_LITE vega-embed@$VEGA_EMBED (npm; LICENSE.vega from vega-view@$VEGA_VIEW)"
  sha256sum vega.min.js vega-lite.min.js vega-embed.min.js LICENSE.vega LICENSE.vega-lite LICENSE.vega-embed
} > SHA256SUMS
cat SHA256SUMS
