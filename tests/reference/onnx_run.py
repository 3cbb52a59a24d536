"""Runs an ONNX model (e.g. from `ctseg export --format onnx`) on ONNX Runtime's CPU provider
after onnx.checker's full check, and prints one JSON line.

It is the reference side of ctseg's ONNX export test: ctseg writes the model and an input,
this script checks the model the way deployment tools will load it and runs it.

Usage:
    pip install numpy onnx onnxruntime
    python3 tests/reference/onnx_run.py --model m.onnx --input x.f32 --shape N,C,H,W --output y.f32

--input is raw little-endian float32 in the given shape (or a .npy file, when --shape may be
left out); --output (optional) receives the model's first output as raw little-endian float32.
Prints {"checker":"ok","outputs":[N,classes,H,W],"max":...}: the checker's verdict, the shape
of the first output and its largest value. Options:
    --reference r.f32   adds "max_abs_diff" between the output and r.f32 (raw f32, same size)
    --metadata          adds "metadata": the model's metadata_props, and "producer"
    --threads N         ONNX Runtime intra-op threads (default 2)
Exit status: 0 success; 1 the checker rejected the model (then "checker" holds its message and
the model is not run); 2 bad arguments or files, or ONNX Runtime refused to run the input
(message on stderr).
"""
import argparse
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def die(msg):
    print(f"onnx_run: {msg}", file=sys.stderr)
    sys.exit(2)


def read_input(path, shape):
    if path.endswith(".npy"):
        x = np.load(path).astype("<f4", copy=False)
        if shape is not None and tuple(x.shape) != tuple(shape):
            die(f"{path} has shape {list(x.shape)}, --shape says {shape}")
        return x
    if shape is None:
        die("--shape N,C,H,W is required for a raw f32 input")
    x = np.fromfile(path, dtype="<f4")
    if x.size != int(np.prod(shape)):
        die(f"{path} holds {x.size} float32 values, --shape {shape} needs {int(np.prod(shape))}")
    return x.reshape(shape)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--shape", help="N,C,H,W of a raw f32 input")
    ap.add_argument("--output")
    ap.add_argument("--reference")
    ap.add_argument("--metadata", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    try:
        shape = [int(s) for s in a.shape.split(",")] if a.shape else None
    except ValueError:
        die(f"--shape {a.shape!r} is not N,C,H,W")
    try:
        x = read_input(a.input, shape)
        model = onnx.load(a.model)
    except Exception as e:  # a missing file, or bytes protobuf cannot parse (DecodeError)
        die(f"{a.model}: {e}")

    result = {}
    try:
        onnx.checker.check_model(model, full_check=True)
        result["checker"] = "ok"
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        print(json.dumps({"checker": str(e)}))
        sys.exit(1)

    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    except Exception as e:  # e.g. an input shape the model does not accept
        die(f"onnxruntime: {e}")
    result["outputs"] = list(y.shape)
    result["max"] = float(y.max())
    if a.output:
        y.astype("<f4").tofile(a.output)
    if a.reference:
        r = np.fromfile(a.reference, dtype="<f4")
        if r.size != y.size:
            die(f"{a.reference} holds {r.size} float32 values, the output has {y.size}")
        result["max_abs_diff"] = float(np.abs(y.reshape(-1).astype(np.float64) - r).max())
    if a.metadata:
        meta = sess.get_modelmeta()
        result["metadata"] = dict(meta.custom_metadata_map)
        result["producer"] = f"{meta.producer_name} {model.producer_version}".strip()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
