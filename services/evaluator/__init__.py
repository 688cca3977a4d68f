"""evaluator: benchmark video LLMs on video QA (MVBench, TempCompass, Video-Bench, Video-ChatGPT, the
qa-generator's own multiple choice) and measure keyframe style consistency; see README.md.

Entry points: ``evaluate.Evaluator`` (the domain, transport-free; its request and result records are in
``request``), ``server`` (the gRPC servicer), ``cli`` (the same evaluation from a shell)."""
