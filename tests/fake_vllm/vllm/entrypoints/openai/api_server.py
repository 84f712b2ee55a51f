"""``python -m vllm.entrypoints.openai.api_server`` stand-in for testing the labelling recipes' scripts.

On ``PYTHONPATH`` in tests/test_sharding.py only: serves ``tests/fake_llm_server.py`` with the served model
name and port the script asks for (the other vLLM arguments are accepted and ignored).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from fake_llm_server import serve  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--served-model-name", default=None)
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=8000)
args, _ = parser.parse_known_args()
if args.host != "127.0.0.1":
    sys.exit("the fake vLLM server only listens on 127.0.0.1")
serve(args.port, args.served_model_name or args.model)
