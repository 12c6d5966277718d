"""The dataset converters: the recipe's training sets, as their publishers lay them out, into the WebDataset shards
the stage configs read. A tool with its own audience, run as `python prepare.py <set> --src DIR` from the
repository's root: convert.py checks, writes and resumes; published.py (The Cauldron, SmolTalk, RLAIF-V) and
published_video.py (OpenVid-1M, WebVid, LLaVA-Video-178K) read the published layouts; streams.py reads large
CSV, JSON, zip and parquet files piece by piece."""

# command -> (output name, what it converts): prepare.py's subcommands (convert.READERS has their readers)
DATASETS = {
    "openvid": ("openvid", "OpenVid-1M (CSV + zip parts) -> video caption"),
    "webvid": ("webvid", "WebVid as video2dataset writes it (NNNNN.tar) -> video caption"),
    "cauldron": ("cauldron", "The Cauldron -> image QA"),
    "smoltalk": ("smoltalk", "SmolTalk (data/all/train-*) -> text chat"),
    "rlaif-v": ("rlaif_v", "RLAIF-V -> DPO pair"),
    "llava-video": ("llava_video", "LLaVA-Video-178K -> video caption and video QA"),
}
