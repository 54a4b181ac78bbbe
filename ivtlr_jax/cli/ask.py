"""Ask a trained IVT-LR model about an image: prints the generated text and the answer.

The model folder is a stage export of a training run (runs/<name>/stage_<s>), the output of
ivtlr-convert-official, or any model folder with the <|latent|> tokens. It is asked as it was trained:
its dataset's prompt (M3CoT or ScienceQA text, the training or the official evaluation format), latents, K,
patch order and dtype come from the folder's ivtlr_settings.json (or the run's config.yaml beside a stage
export); the options below override them.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from . import make_parser

USAGE = "%(prog)s --checkpoint DIR --image FILE [--choice TEXT ...] [options] QUESTION"
EPILOG = """\
examples:
  {cmd} --checkpoint outputs/tiny/runs/tiny/stage_3 --image outputs/tiny/example.png \\
      "Which shape is in the picture?" --choice circle --choice square --choice triangle --choice star
  {cmd} --checkpoint checkpoints/ivtlr-m3cot --image photo.jpg "What is the man holding?" \\
      --save-attention patches.png --json
"""


def main(argv=None, prog: str = "ivtlr-ask") -> None:
    p = make_parser(prog, USAGE, __doc__, EPILOG)
    p.add_argument("question", metavar="QUESTION", help="the question (quote it)")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="the model folder (or a hub id)")
    p.add_argument("--image", required=True, metavar="FILE", help="the image (any format PIL reads)")
    p.add_argument("--choice", action="append", default=None, metavar="TEXT",
                   help="an answer option (repeat for each, in order A, B, ...); the answer is then a letter")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help="default: the folder's (512)")
    p.add_argument("--save-attention", default=None, metavar="PNG",
                   help="draw the patches chosen at each latent step on the image")
    p.add_argument("--json", action="store_true", help="print the whole answer as one JSON object")
    p.add_argument("--latents", type=int, default=None, metavar="N", help="<|latent|> tokens (default: 3)")
    p.add_argument("--patches", type=int, default=None, metavar="K", help="patches selected per latent step")
    p.add_argument("--prompt-format", choices=("train", "official"), default=None)
    p.add_argument("--dataset", choices=("m3cot", "scienceqa"), default=None, help="whose prompt text to use")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    args = p.parse_args(argv)
    from ..config import ConfigError
    from ..predict import DEFAULT_MAX_PIXELS, Predictor, Question, RequestError, checked_image

    overrides = {k: v for k, v in dict(num_latents=args.latents, num_selected_patches=args.patches,
                                       prompt_format=args.prompt_format, dataset=args.dataset,
                                       dtype=args.dtype).items() if v is not None}
    try:
        checked_image(args.image, DEFAULT_MAX_PIXELS)  # before the model loads
        predictor = Predictor.from_folder(args.checkpoint, **overrides)
        question = Question(args.image, args.question, args.choice)
        encoded = predictor.encode(question)  # checked before any generation
        answer = predictor.predict(question, max_new_tokens=args.max_new_tokens)
    except (ConfigError, RequestError, FileNotFoundError) as err:
        p.exit(2, f"{prog}: error: {err}\n")
    if args.save_attention:
        predictor.picture(encoded, answer, args.save_attention)
    if args.json:
        print(json.dumps(dataclasses.asdict(answer)))
    else:
        print(answer.text.strip())
        print(f"answer: {answer.answer if answer.answer is not None else '(none named)'}")
    if args.save_attention:
        print(f"patches chosen at each latent step: {args.save_attention}", file=sys.stderr)


if __name__ == "__main__":
    main()
