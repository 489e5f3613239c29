"""ImageBind embedding throughput (items/s) per modality: ours, and upstream's code beside it.

    python benchmarks/imagebind_embed.py [--quick] [--config huge] [--modalities vision,text]
        [--dtypes float32,bfloat16] [--batches 1,8] [--modes eager,compile]
        [--upstream /path/to/ImageBind] [--out DIR]

The same as `surgery bench imagebind ...` (the imagebind plugin's plugins/imagebind/bench_embed.py).
"""

import sys

from surgery.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "imagebind", *sys.argv[1:]]))
