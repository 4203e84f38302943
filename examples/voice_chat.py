"""Voice chat with an `edge-af3 serve` (or any server with OpenAI's chat + speech routes), turn by
turn: record a question (or take a file), send it as audio, stream the answer's text, then play
(or write) the answer spoken by the server's `/v1/audio/speech`. The conversation is kept, each
question as audio, as AF3-Chat takes it.

    edge-af3 serve -m BUNDLE --voice piper &
    python examples/voice_chat.py --base-url http://127.0.0.1:8000/v1              # microphone, 5 s turns
    python examples/voice_chat.py --file question.wav --out answer.wav             # one turn, no devices

Needs `openai` (pip install 'edge-af3[client]'); the microphone and speaker need sounddevice.
"""

from __future__ import annotations

import argparse
import base64
import io
import wave

import numpy as np


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def record(seconds: float, rate: int = 16000) -> bytes:
    import sounddevice as sd

    print(f"(speak now: {seconds:g} s)")
    x = sd.rec(int(seconds * rate), samplerate=rate, channels=1, dtype="float32")
    sd.wait()
    return wav_bytes(x[:, 0], rate)


def play(wav: bytes) -> None:
    import sounddevice as sd

    with wave.open(io.BytesIO(wav)) as w:
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
    sd.play(x, rate)
    sd.wait()


def turn(client, model: str, history: list, question_wav: bytes, voice: str) -> tuple[str, bytes]:
    """One voice turn: the question as audio, the answer's text streamed, then its speech."""
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(question_wav).decode(), "format": "wav"}}
    history.append({"role": "user", "content": [audio]})
    text = []
    for chunk in client.chat.completions.create(model=model, messages=history, stream=True, temperature=0):
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta:
            text.append(delta)
            print(delta, end="", flush=True)
    print()
    answer = "".join(text)
    history.append({"role": "assistant", "content": answer})
    speech = client.audio.speech.create(model="tts-1", voice=voice, input=answer or "...", response_format="wav")
    return answer, speech.content


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model", default="edge-af3")
    ap.add_argument("--voice", default="default", help="a voice the server was started with (serve --voice)")
    ap.add_argument("--file", action="append", help="question audio files, one turn each (default: the microphone)")
    ap.add_argument("--out", help="write the last answer's speech here instead of playing it")
    ap.add_argument("--seconds", type=float, default=5.0, help="microphone turn length")
    args = ap.parse_args(argv)

    from openai import OpenAI

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    history: list = []
    questions = [open(f, "rb").read() for f in args.file] if args.file else None
    while True:
        wav = questions.pop(0) if questions is not None else record(args.seconds)
        _, speech = turn(client, args.model, history, wav, args.voice)
        if args.out:
            with open(args.out, "wb") as f:
                f.write(speech)
        else:
            play(speech)
        if questions is not None and not questions:
            break


if __name__ == "__main__":
    main()
