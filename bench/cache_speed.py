"""Data preparation time with an empty slice cache (cold) against a filled one (warm), on BraTS.

Calls aeplat.platform.search.prepare_data, the step of run_search that decodes the dataset
or reads it from the content-keyed cache. Each repetition runs it once with a new empty
cache folder (cold: scan, fingerprint, decode every NIfTI volume, write the entry) and once
more with the same folder (warm: scan, fingerprint, read the entry). The ratio of a
repetition is cold ÷ warm. The source files stay in the operating system's page cache after
the first read, so cold means an empty aeplat cache, not an empty page cache.

The warm time is also split into its parts: the scan of the data folder, the content
fingerprint (sha256 of every source file) and the read of the .npz entry.

    .venv/bin/python bench/cache_speed.py --data-dir ../shared/data/brats --repeats 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from aeplat.data.adapters import get_adapter
from aeplat.data.cache import SliceCache, fingerprint_files
from aeplat.platform.search import prepare_data
from aeplat.platform.settings import SearchSettings
from perf_common import DEFAULT_DATA_DIR, Stopwatch, link_cases, load_average, machine_text, spread


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder of BraTS cases (default: %(default)s)")
    parser.add_argument("--cases", type=int, default=None, help="use the first CASES cases by name (default: all)")
    parser.add_argument("--modality", default="flair", help="MRI sequence (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the slices in pixels (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="cold and warm pairs (default: %(default)s)")
    return parser.parse_args(argv)


def warm_parts(settings: SearchSettings, cache_key: str) -> dict[str, float]:
    """Time the three parts of a warm preparation separately: scan, fingerprint, entry read."""
    adapter = get_adapter(settings.dataset)
    adapter_settings = adapter.settings_from_options(settings.dataset_options())
    with Stopwatch() as scan_time:
        scan = adapter.scan(Path(settings.data_dir), adapter_settings)
    with Stopwatch() as fingerprint_time:
        fingerprint_files(scan.source_files)
    with Stopwatch() as read_time:
        entry = SliceCache(settings.cache_dir).load_entry(cache_key)
    if entry is None:
        raise RuntimeError(f"cache entry {cache_key} is missing after a warm preparation")
    return {"scan": scan_time.seconds, "fingerprint": fingerprint_time.seconds, "read": read_time.seconds}


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    load_before = load_average()
    rows = []
    with tempfile.TemporaryDirectory(prefix="aeplat-bench-cache-") as temporary:
        work_dir = Path(temporary)
        data_dir = link_cases(arguments.data_dir, arguments.cases, work_dir)
        for number in range(1, arguments.repeats + 1):
            settings = SearchSettings(
                dataset="brats",
                data_dir=data_dir,
                modality=arguments.modality,
                image_size=arguments.image_size,
                cache_dir=work_dir / f"cache-{number}",
            )
            with Stopwatch() as cold:
                cold_result = prepare_data(settings)
            with Stopwatch() as warm:
                warm_result = prepare_data(settings)
            if cold_result.cache_hit or not warm_result.cache_hit:
                raise RuntimeError("the cold run hit the cache or the warm run missed it")

            parts = warm_parts(settings, warm_result.cache_key)
            entry_mib = SliceCache(settings.cache_dir).path(warm_result.cache_key).stat().st_size / 2**20
            rows.append((cold.seconds, warm.seconds, parts, load_average()))
            print(
                f"repetition {number}: cold {cold.seconds:.2f} s, warm {warm.seconds:.3f} s, ratio {cold.seconds / warm.seconds:.1f}; "
                f"warm parts: scan {parts['scan']:.3f} s, fingerprint {parts['fingerprint']:.3f} s, entry read {parts['read']:.3f} s; "
                f"load average {rows[-1][3]}",
                flush=True,
            )

    slices = len(warm_result.slices)
    print()
    print(
        f"{warm_result.source_files} source files, {slices} slices of {arguments.image_size}×{arguments.image_size}, "
        f"cache entry {entry_mib:.1f} MiB; {machine_text()}; load average before {load_before}, after {load_average()}"
    )
    print()
    print("| measure | median (quartiles; min to max; n) |")
    print("| --- | --- |")
    print(f"| cold ÷ warm | {spread(cold / warm for cold, warm, _, _ in rows).format(1)} |")
    print(f"| cold s | {spread(cold for cold, _, _, _ in rows).format(2)} |")
    print(f"| warm s | {spread(warm for _, warm, _, _ in rows).format(3)} |")
    for part in ("scan", "fingerprint", "read"):
        print(f"| warm part: {part} s | {spread(parts[part] for _, _, parts, _ in rows).format(3)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
