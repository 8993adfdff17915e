#!/usr/bin/env python
"""Class-agnostic COCO AP of exported pseudo-masks for each choice of the export options of
``tools/generate_pseudo_masks.py`` (levels, ``--max-area-fraction``, ``--max-per-image``),
computed from ONE unfiltered run (``--levels all --max-area-fraction 1 --max-per-image 0``):
every choice is a subset of that run's masks, so nothing is generated twice.

    python projects/OAP/experiments/export_filter_sweep.py RESULTS.json --gt GT \
        [--levels instance instance:-1 ...] [--area 1 0.9 0.7 0.5] [--per-image 0 20 50]

Prints a Markdown table (masks per image, segm / bbox AP, AP50, AR100) sorted as given.
"""
import argparse
import contextlib
import io


def main(argv=None):
    from hiseg_oap.pseudo_labels import (evaluate_results, filter_results, load_ground_truth, load_results,
                                         mask_area_fraction, parse_level_specs, resolve_levels)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="unfiltered results JSON of generate_pseudo_masks.py --levels all")
    ap.add_argument("--gt", required=True, help="COCO JSON or registered dataset")
    ap.add_argument("--levels", nargs="+", default=["instance", "instance:-1", "instance:0", "instance:1-4",
                                                     "instance:2-4", "all"])
    ap.add_argument("--area", type=float, nargs="+", default=[1.0, 0.9, 0.7, 0.5])
    ap.add_argument("--per-image", type=int, nargs="+", default=[0])
    ap.add_argument("--num-layers", type=int, default=5)
    args = ap.parse_args(argv)

    import hiseg.data  # noqa: F401  (a --gt dataset name may be one of ours)

    results = load_results(args.results)
    coco, _ = load_ground_truth(args.gt)
    # every GT image the run covered (an image without any mask left still counts its misses)
    ids = sorted({r["image_id"] for r in results} & {im["id"] for im in coco["images"]})
    print(f"{len(results)} masks of {len(ids)} images; GT {args.gt}")
    print("| levels | max area | max/img | masks/img | >90% of image | segm AP | AP50 | AR100 | bbox AP | AP50 | AR100 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for spec in args.levels:
        want = set(resolve_levels(parse_level_specs(spec), args.num_layers))
        chosen = [r for r in results if (r["level"], r["layer"]) in want]
        for area in args.area:
            for per in args.per_image:
                kept = filter_results(chosen, max_area_fraction=area, max_per_image=per)
                big = sum(mask_area_fraction(r) > 0.9 for r in kept)
                with contextlib.redirect_stdout(io.StringIO()):
                    m = evaluate_results(kept, coco, image_ids=ids)
                s, b = m["segm"], m["bbox"]
                print(f"| {spec} | {area:g} | {per or '-'} | {len(kept) / len(ids):.1f} | {big} | "
                      f"{s['AP']:.2f} | {s['AP50']:.2f} | {s['AR100']:.2f} | {b['AP']:.2f} | {b['AP50']:.2f} | "
                      f"{b['AR100']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
