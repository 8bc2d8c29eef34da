"""The OpenAI-compatible server: a real `longgen serve` process on localhost driven by the official client and raw
HTTP, continuous batching against running each request alone; and the engine's pieces (stop strings, incremental
detokenization, scheduling, failures) directly."""

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig

from longgen import SinkWindow
from longgen.infer.engine import (
    Engine,
    IncrementalDetokenizer,
    InvalidRequestError,
    SamplingParams,
    StopStrings,
    admission_rows,
)
from longgen.infer.runner import ModelRunner, row_kv_bytes
from longgen.model import convert_checkpoint, load_model
from longgen.model.convert import convert_config
from test_model import make_checkpoint

pytest.importorskip("fastapi")  # the serve extra (also in the test extra)
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ {'system': 'w1', 'user': 'w3', 'assistant': 'w4'}[m['role']] }} {{ m['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}w4{% endif %}"
)
ROWS = ["--max-batch", "2", "--prefill-chunk", "4"]  # 2 rows; prompts enter in slices of 4 tokens
EOS = 2  # the tiny model's generation config (its tokenizer has no EOS)


# -- the engine's pieces ------------------------------------------------------------------------------------------
def byte_tokenizer():
    """Byte-level BPE trained on ASCII only: every non-ASCII character is split over several byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog. STOP here; END done " * 20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def test_stop_strings_never_leak_and_cut_at_the_first():
    s = StopStrings(["END", "xyz"])
    assert s.push("the E") == ("the ", False)  # "E" could start "END": held back
    assert s.push("N") == ("", False)
    assert s.push("D and more") == ("", True)  # "END" complete: nothing of it is emitted
    s = StopStrings(["END"])
    assert s.push("the EN") == ("the ", False)
    assert s.push("d") == ("ENd", False)  # not a stop after all: released
    assert s.push("EN") == ("", False) and s.flush() == "EN"  # ends without completing it: the text is kept
    s = StopStrings(["b c", "c"])
    assert s.push("a b c d") == ("a ", True)  # the earliest occurrence wins
    assert StopStrings([]).push("anything") == ("anything", False)


def test_incremental_detokenizer_never_splits_a_character():
    tok = byte_tokenizer()
    text = "the fox says 日本 😀 héllo END"
    ids = tok(text).input_ids
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) + detok.flush() == text == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
    assert deltas.count("") >= 5  # the multi-byte characters waited for their last byte
    # the prompt's last tokens give context: the continuation keeps its leading space
    prompt, cont = tok("the lazy").input_ids, tok(" dog").input_ids
    detok = IncrementalDetokenizer(tok, prompt)
    assert "".join(detok.push(i) for i in cont) == " dog"
    # an incomplete character at the very end comes out as U+FFFD
    detok = IncrementalDetokenizer(tok)
    assert detok.push(tok("😀").input_ids[0]) == "" and detok.flush() == "\ufffd"


class ScriptedRunner:
    """Stands in for `ModelRunner`: a row whose prompt starts with token p continues with scripts[p] (then token
    0 forever); records prefills and the rows of each decode step; `fail_on` prompts fail their prefill."""

    def __init__(self, scripts, max_batch=2, max_len=64, fail_on=()):
        cfg = LlamaConfig(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max_len,
        )
        self.config = convert_config(cfg, pattern=SinkWindow(2, 8))
        self.max_batch, self.max_len, self.device, self.dtype = max_batch, max_len, torch.device("cpu"), torch.float32
        self.scripts, self.fail_on = scripts, set(fail_on)
        self.state, self.prefills, self.active_counts = {}, [], []

    def _logits(self, row):
        script, step = self.state[row]
        out = torch.zeros(self.config.vocab_size)
        out[script[step] if step < len(script) else 0] = 1.0
        return out

    def prefill(self, row, ids, start=0):
        assert start == 0  # the engine here prefills whole prompts
        self.prefills.append(ids[0])
        if ids[0] in self.fail_on:
            raise RuntimeError("boom")
        self.state[row] = [self.scripts[ids[0]], 0]
        return self._logits(row)

    def decode(self, tokens, active):
        self.active_counts.append(sum(active))
        out = torch.zeros(self.max_batch, self.config.vocab_size)
        for row, on in enumerate(active):
            if on:
                self.state[row][1] += 1
                out[row] = self._logits(row)
        return out

    def release(self, row):
        self.state.pop(row, None)

    def allocated_bytes(self):
        return 0


def run_all(engine, requests):
    """Submit (prompt, params) pairs, wait for all; returns per request (deltas, last output)."""
    results = [([], []) for _ in requests]
    done = threading.Semaphore(0)

    def deliver(i):
        def take(out):
            results[i][0].append(out.text)
            if out.finished:
                results[i][1].append(out)
                done.release()

        return take

    for i, (prompt, params) in enumerate(requests):
        engine.submit(prompt, params, deliver(i))
    engine.start()
    try:
        for _ in requests:
            assert done.acquire(timeout=30)
    finally:
        engine.shutdown()
    return [(deltas, last[0]) for deltas, last in results]


def test_engine_finishes_on_stop_strings_eos_and_length():
    tok = byte_tokenizer()
    eos = tok.eos_token_id
    scripts = {
        10: tok(" the fox END done").input_ids,
        11: [*tok(" 日本 😀").input_ids, eos, *tok(" never").input_ids],
        12: tok(" the lazy dog jumps").input_ids,
    }
    greedy = dict(temperature=0.0, max_tokens=20)
    runs = run_all(
        Engine(ScriptedRunner(scripts), tok),
        [
            ([10, 5], SamplingParams(stop=("END",), **greedy)),
            ([11], SamplingParams(**greedy)),
            ([12], SamplingParams(temperature=0.0, max_tokens=3)),
        ],
    )
    (d0, o0), (d1, o1), (d2, o2) = runs
    assert "".join(d0) == " the fox " and o0.finish_reason == "stop"
    assert not any("E" in d for d in d0)  # the stop string's start was held back, never sent
    assert "".join(d1) == " 日本 😀" and o1.finish_reason == "stop"  # EOS: stops, and is not text
    assert o1.completion_tokens == len(scripts[11]) - len(tok(" never").input_ids)  # EOS counted, nothing after it
    assert not any("\ufffd" in d for d in d1)
    assert o2.finish_reason == "length" and o2.completion_tokens == 3 and o2.prompt_tokens == 1
    assert "".join(d2) == tok.decode(scripts[12][:3])


def test_engine_admits_first_come_first_served_and_a_failure_fails_only_its_request():
    tok = byte_tokenizer()
    words = tok(" the quick brown fox").input_ids
    runner = ScriptedRunner({p: words for p in range(20, 26)}, max_batch=2, fail_on={22})
    engine = Engine(runner, tok)
    params = SamplingParams(temperature=0.0, max_tokens=len(words))
    runs = run_all(engine, [([p], params) for p in range(20, 26)])
    assert runner.prefills == list(range(20, 26))  # FIFO
    assert max(runner.active_counts) == 2  # never more rows than there are
    for p, (deltas, out) in zip(range(20, 26), runs, strict=True):
        if p == 22:
            assert out.error is not None and "boom" in out.error
        else:
            assert out.error is None and "".join(deltas) == " the quick brown fox"
    stats = engine.stats()
    assert (stats["finished_total"], stats["failed_total"], stats["running"], stats["waiting"]) == (5, 1, 0, 0)


def test_engine_survives_a_failed_decode_step_and_cancels_waiting_requests():
    tok = byte_tokenizer()
    runner = ScriptedRunner({30: tok(" the fox").input_ids}, max_batch=1)
    real_decode, calls = runner.decode, []

    def flaky(tokens, active):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device fell over")
        return real_decode(tokens, active)

    runner.decode = flaky
    engine = Engine(runner, tok)
    gone = engine.submit([30], SamplingParams(temperature=0.0), lambda out: None)
    engine.cancel(gone)  # still waiting: ends at once
    params = SamplingParams(temperature=0.0, max_tokens=4)
    (_, first), (deltas, second) = run_all(engine, [([30], params), ([30], params)])
    assert "device fell over" in first.error
    assert second.error is None and "".join(deltas) == " the fox"
    assert engine.stats()["cancelled_total"] == 1


def test_admission_rows_follow_the_kv_budget():
    cfg = ScriptedRunner({}).config
    per_row = row_kv_bytes(cfg, 64, torch.bfloat16)
    assert admission_rows(cfg, 64, 8, None) == 8
    assert admission_rows(cfg, 64, 8, 3 * per_row + 1) == 3
    assert admission_rows(cfg, 64, 2, 3 * per_row) == 2
    with pytest.raises(ValueError, match="holds no sequence"):
        admission_rows(cfg, 64, 8, per_row - 1)
    with pytest.raises(InvalidRequestError, match="top_p") as e:
        SamplingParams(top_p=0.0)
    assert e.value.param == "top_p"


def test_app_without_chat_template_and_with_failing_generation():
    from starlette.testclient import TestClient

    from longgen.infer.server import create_app

    tok = byte_tokenizer()
    engine = Engine(ScriptedRunner({40: tok(" the fox").input_ids}, fail_on={41}), tok)
    with TestClient(create_app(engine, "scripted")) as client:
        r = client.post(
            "/v1/chat/completions", json={"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
        for stream in (False, True):
            r = client.post("/v1/completions", json={"model": "scripted", "prompt": [41], "stream": stream})
            assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
            assert r.json()["error"]["type"] == "server_error"
        r = client.post(
            "/v1/completions", json={"model": "scripted", "prompt": [40], "max_tokens": 3, "temperature": 0}
        )
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == " the fox"


# -- a real server ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    make_checkpoint(root / "src")
    path = root / "tiny-hybrid"
    convert_checkpoint(root / "src", path, pattern=SinkWindow(2, 8), target_length=1024, rope="ntk", progress=False)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(hybrid, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("log") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "longgen", "serve", str(hybrid), "--port", str(port), "--device", "cpu", *ROWS],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        yield base, log
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def reference(hybrid):
    """Greedy continuation of prompt ids by `ModelRunner.generate` alone, and its text and finish reason."""
    tok = AutoTokenizer.from_pretrained(hybrid)
    runner = ModelRunner(load_model(hybrid, dtype=torch.float32).eval(), max_batch=1)

    def greedy(ids, n):
        new = runner.generate([ids], n, eos_token_id=EOS)[0]
        finish = "stop" if new[-1] == EOS else "length"
        text = tok.decode(ids + [t for t in new if t != EOS], skip_special_tokens=True)
        head = tok.decode(ids, skip_special_tokens=True)
        assert text.startswith(head)
        return text[len(head) :], finish, len(new)

    greedy.tokenizer = tok
    return greedy


def test_engine_prefills_a_long_prompt_in_slices_between_decode_steps(hybrid, reference):
    """`prefill_chunk`: a long prompt enters its row in slices while the other row keeps decoding; both requests
    give exactly the tokens they give alone."""
    tok = reference.tokenizer
    runner = ModelRunner(load_model(hybrid, dtype=torch.float32).eval(), max_batch=2, max_len=200)
    calls = []  # (what, row or active rows, start): the real runner, its calls recorded
    real_prefill, real_decode = runner.prefill, runner.decode

    def prefill(row, ids, start=0):
        calls.append(("prefill", row, start))
        return real_prefill(row, ids, start)

    def decode(tokens, active):
        calls.append(("decode", [i for i, a in enumerate(active) if a], None))
        return real_decode(tokens, active)

    runner.prefill, runner.decode = prefill, decode
    short = tok("w5 w6 w7").input_ids
    long = tok(" ".join(f"w{(5 * j) % 97}" for j in range(40))).input_ids
    engine = Engine(runner, tok, eos_token_ids=[EOS], prefill_chunk=16)
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    (d_short, o_short), (d_long, o_long) = run_all(engine, [(short, greedy), (long, greedy)])
    for (deltas, out), ids in (((d_short, o_short), short), ((d_long, o_long), long)):
        text, finish, _ = reference(ids, 12)
        assert out.error is None and "".join(deltas) == text and out.finish_reason == finish
    long_row = next(row for what, row, start in calls if what == "prefill" and start > 0)
    slices = [start for what, row, start in calls if what == "prefill" and row == long_row]
    # 16 prompt tokens per turn, first come first served: the first turn also holds the whole short prompt
    assert slices == [0, *range(16 - len(short), len(long), 16)]
    between = calls[calls.index(("prefill", long_row, 0)) : calls.index(("prefill", long_row, slices[-1]))]
    assert any(what == "decode" and 1 - long_row in rows for what, rows, _ in between)  # the short one went on
    assert all(long_row not in rows for what, rows, _ in between if what == "decode")  # the long one waited
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
        Engine(runner, tok, prefill_chunk=0)


def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=120)


def test_completions_equal_greedy_generation_streamed_or_not(server, reference):
    base, log = server
    prompt = "w5 w17 w33 w8 w90"
    text, finish, n = reference(reference.tokenizer(prompt).input_ids, 12)
    r = client(base).completions.create(model="tiny-hybrid", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == text and r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, n, 5 + n)
    chunks = list(
        client(base).completions.create(model="tiny-hybrid", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish and len(chunks) > 3
    assert "2 rows" in log.read_text() and "bytes per row" in log.read_text()  # admission printed at startup


def test_chat_completions_use_the_chat_template(server, reference):
    base, _ = server
    messages = [{"role": "system", "content": "w9 w10"}, {"role": "user", "content": "w5 w6 w7"}]
    tok = reference.tokenizer
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    text, finish, n = reference(ids.input_ids, 8)
    r = client(base).chat.completions.create(model="tiny-hybrid", messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish and r.usage.completion_tokens == n
    chunks = list(
        client(base).chat.completions.create(
            model="tiny-hybrid",
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == n


def test_models_and_health(server):
    base, _ = server
    assert [m.id for m in client(base).models.list().data] == ["tiny-hybrid"]
    health = httpx.get(f"{base}/health").json()
    assert health["status"] == "ok" and health["rows"] == 2 and health["max_len"] == 1024
    assert health["kv_bytes_allocated"] == 2 * health["kv_bytes_per_row"]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    base, _ = server
    good = {"model": "tiny-hybrid", "prompt": "w5 w6", "max_tokens": 4, "temperature": 0}
    cases = [
        ('{"model": "tiny-hybrid", "prompt": ', 400, "not valid JSON", None),
        ({**good, "frobnicate": 1}, 400, "unknown field 'frobnicate'", "frobnicate"),
        ({**good, "prompt": "w5 " * 1100}, 400, "at most 1023", "prompt"),
        ({**good, "max_tokens": 0}, 400, "max_tokens must be >= 1", "max_tokens"),
        ({**good, "max_tokens": 1023}, 400, "lower max_tokens to at most 1022", "max_tokens"),
        ({**good, "temperature": -0.5}, 400, "temperature must be >= 0", "temperature"),
        ({**good, "top_p": 1.5}, 400, "top_p must be in (0, 1]", "top_p"),
        ({**good, "n": 2}, 400, "n must be 1", "n"),
        ({**good, "logprobs": 2}, 400, "logprobs is not supported", "logprobs"),
        ({**good, "model": "gpt-4"}, 404, "does not exist", "model"),
    ]
    for body, status, message, param in cases:
        content = body if isinstance(body, str) else json.dumps(body)
        r = httpx.post(f"{base}/v1/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert message in err["message"] and err["param"] == param, (body, err)
        assert err["type"] == "invalid_request_error"
    chat = {"model": "tiny-hybrid", "messages": [{"role": "user", "content": "w5", "tool_calls": []}]}
    r = httpx.post(f"{base}/v1/chat/completions", json=chat)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.tool_calls"
    r = httpx.post(f"{base}/v1/completions", json=good)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_concurrent_requests_share_two_rows_and_each_equals_running_alone(server, reference):
    base, _ = server
    prompts = [" ".join(f"w{(7 * i + 3 * j) % 120}" for j in range(3 + 2 * i)) for i in range(6)]
    expected = [reference(reference.tokenizer(p).input_ids, 6 + i) for i, p in enumerate(prompts)]
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(httpx.get(f"{base}/health").json())
            time.sleep(0.05)

    def ask(i):
        kw = dict(model="tiny-hybrid", prompt=prompts[i], max_tokens=6 + i, temperature=0)
        if i % 2:
            return "".join(c.choices[0].text for c in client(base).completions.create(stream=True, **kw))
        return client(base).completions.create(**kw).choices[0].text

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(6) as pool:
            texts = list(pool.map(ask, range(6)))
    finally:
        stop.set()
        watcher.join()
    assert texts == [text for text, _, _ in expected]
    assert seen and max(h["running"] for h in seen) <= 2
    health = httpx.get(f"{base}/health").json()
    assert health["running"] == 0 and health["waiting"] == 0


def wait_for_cancel(base, before, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = httpx.get(f"{base}/health").json()
        if h["cancelled_total"] == before + 1 and h["running"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"request not cancelled: {h}")


def test_a_client_that_disconnects_cancels_its_request(server):
    base, _ = server
    body = {"model": "tiny-hybrid", "prompt": "w5 w6 w7", "max_tokens": 1000, "temperature": 0}
    before = httpx.get(f"{base}/health").json()["cancelled_total"]
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert next(r.iter_lines()).startswith("data: ")  # generating; now hang up
    wait_for_cancel(base, before)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", json=body, timeout=1.5)
    wait_for_cancel(base, before + 1)
