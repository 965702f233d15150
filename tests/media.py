"""Small media files the tests write themselves (videos with PyAV)."""
import av
import numpy as np


def write_video(path, channel: int, frames: int = 12, fps: int = 6, size=(40, 48)) -> None:
    """A 2 s PyAV-written clip: colour channel `channel` bright, a white square moving right."""
    with av.open(str(path), mode='w') as container:
        stream = container.add_stream('mpeg4', rate=fps)
        stream.height, stream.width = size
        stream.pix_fmt = 'yuv420p'
        for i in range(frames):
            img = np.full(size + (3,), 20, np.uint8)
            img[..., channel] = 230
            img[16:24, 2 * i: 2 * i + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format='rgb24')):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
