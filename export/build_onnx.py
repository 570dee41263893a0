"""python export/build_onnx.py --ckpt CKPT --out DIR [--base BASE] [--prompts-from PATH] [--dtype fp32|fp16|bf16] [--opset N]"""

import sys

from editreward_export.onnx_export import main

if __name__ == "__main__":
    sys.exit(main())
