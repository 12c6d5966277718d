"""The dataset converters: the recipe's training sets, as their publishers lay them out, into the WebDataset shards
the stage configs read. A tool with its own audience, run as `python prepare.py <set> --src DIR` from the
repository's root: convert.py checks, writes and resumes; published.py (The Cauldron, SmolTalk, RLAIF-V) and
published_video.py (OpenVid-1M, WebVid, LLaVA-Video-178K) read the published layouts; streams.py reads large
CSV, JSON, zip and parquet files piece by piece."""
