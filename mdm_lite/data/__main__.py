"""``python -m mdm_lite.data --dataset flickr30k``: download a dataset into the cache before training."""

import argparse

from . import prefetch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mdm_lite.data", description=__doc__)
    parser.add_argument("--dataset", required=True,
                        help="flickr30k, tiny-imagenet, or a Hub name like owner/name")
    parser.add_argument("--split", default="train")
    parser.add_argument("--hub_name", help="another Hub copy of flickr30k or tiny-imagenet")
    args = parser.parse_args(argv)
    options = {"hub_name": args.hub_name} if args.hub_name else {}
    count = prefetch(args.dataset, args.split, **options)
    print(f"{args.dataset} ({args.split}): {count} samples in the cache")


if __name__ == "__main__":
    main()
