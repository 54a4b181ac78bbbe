"""Serve a trained IVT-LR model over HTTP: OpenAI-compatible chat completions and a page to try it.

  POST /v1/chat/completions   one user message: text + one image (image_url with a base64 data URL);
                              max_tokens, temperature (default 0: greedy), top_p, seed, stream (SSE);
                              answer options in "ivtlr": {"choices": [...]}; the response's "ivtlr" field
                              holds the answer letter and the patches selected at each latent step
  GET  /v1/models, /health    the served model; the load (running, waiting, slots)
  GET  /                      a page: upload an image, ask, watch the answer and the selected patches

Requests decode together by continuous batching (--slots, split over --devices local devices); more
wait in a queue (--max-waiting), beyond which the server answers 503 with Retry-After. SIGTERM or Ctrl-C
stops admitting, lets the requests in flight end (--graceful seconds, then cancels them) and exits.
"""

from __future__ import annotations

from . import make_parser

USAGE = "%(prog)s --checkpoint DIR [--host HOST] [--port PORT] [options]"
EPILOG = """\
examples:
  {cmd} --checkpoint outputs/tiny/runs/tiny/stage_3
  {cmd} --checkpoint checkpoints/ivtlr-m3cot --host 0.0.0.0 --port 8000 --slots 16
"""


def main(argv=None, prog: str = "ivtlr-serve") -> None:
    p = make_parser(prog, USAGE, __doc__, EPILOG)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="the model folder (as for ivtlr-ask)")
    p.add_argument("--host", default="127.0.0.1", help="default: %(default)s (this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--slots", type=int, default=8, metavar="N", help="requests decoding together (default: 8)")
    p.add_argument("--devices", type=int, default=1, metavar="N",
                   help="local devices the slots are split over, slots / N each (default: 1)")
    p.add_argument("--max-waiting", type=int, default=64, metavar="N", help="queued requests at most (default: 64)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="the largest max_tokens a request may ask (default: the folder's, 512)")
    p.add_argument("--graceful", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds the requests in flight get to end (default: 30)")
    p.add_argument("--name", default=None, help="the model name /v1/models reports (default: the folder's name)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="refuse images of more pixels (default: 50,000,000)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (info: one line per request)")
    args = p.parse_args(argv)
    if args.slots < 1 or args.max_waiting < 0:
        p.exit(2, f"{prog}: error: --slots must be >= 1 and --max-waiting >= 0\n")
    if args.devices < 1 or args.slots % args.devices:
        p.exit(2, f"{prog}: error: --slots {args.slots} is not a multiple of --devices {args.devices} (each device "
                  "decodes slots / devices requests)\n")
    from ..config import ConfigError
    from ..predict import DEFAULT_MAX_PIXELS, Predictor, RequestError
    from ..serve import serve

    try:
        predictor = Predictor.from_folder(args.checkpoint, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
                                          devices=args.devices, **({"dtype": args.dtype} if args.dtype else {}))
    except (ConfigError, RequestError, FileNotFoundError, ValueError) as err:
        p.exit(2, f"{prog}: error: {err}\n")
    print(f"serving {predictor.folder} on http://{args.host}:{args.port}/ ({args.slots} slots over "
          f"{args.devices} device(s), {args.max_waiting} may wait)", flush=True)
    serve(predictor, host=args.host, port=args.port, slots=args.slots, max_waiting=args.max_waiting,
          max_new_tokens=args.max_new_tokens, graceful_s=args.graceful, model_name=args.name,
          log_level=args.log_level)


if __name__ == "__main__":
    main()
