"""Convert the recipe's training sets, as published, into the WebDataset shards the stage configs read:

    python prepare.py openvid     --src DIR          [--out data/openvid]      (CSV + zip parts)
    python prepare.py webvid      --src V2D_OUTPUT   [--out data/webvid]       (video2dataset tars)
    python prepare.py cauldron    --src DIR [--subsets ai2d chartqa ...] [--out data/cauldron]
    python prepare.py smoltalk    --src DIR          [--out data/smoltalk]     (data/all/train-* only)
    python prepare.py rlaif-v     --src DIR          [--out data/rlaif_v]
    python prepare.py llava-video --src DIR [--subsets 0_30_s_academic_v0_1 ...] [--out data/llava_video]

The converters live in converters/ (convert.py says what is written, how bad rows are counted and how an
interrupted run resumes); this is their command.
"""

from converters.convert import main

if __name__ == "__main__":
    main()
