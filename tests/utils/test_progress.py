"""Progress lines and their durations."""

from __future__ import annotations

import io

from dad.utils.progress import Progress, format_bytes, format_duration


def test_durations_do_not_wrap_at_a_day():
    assert format_duration(0) == "00:00:00"
    assert format_duration(59.6) == "00:01:00"
    assert format_duration(3 * 3600 + 25 * 60 + 7) == "03:25:07"
    assert format_duration(31 * 3600 + 5 * 60) == "31:05:00"  # a clock format would say 07:05:00
    assert format_duration(float("inf")) == format_duration(float("nan")) == format_duration(-1) == "?"


def test_a_progress_line_counts_and_estimates():
    stream = io.StringIO()
    bar = Progress(total=10, desc="job", unit="img", stream=stream)
    bar.start -= 4.0  # four seconds in
    bar.update(2)
    line = bar.line()
    assert line.startswith("job: 2/10 [ 20.0%] 0.50 img/s ETA 00:00:1")  # 8 images at 0.5/s: 16 s
    assert stream.getvalue().strip() == line.strip()  # not a TTY: plain lines


def test_sizes_read_as_people_read_them():
    assert [format_bytes(n) for n in (45_200, 12_340_000, 1_254_000_000, 3.4e12)] == ["45.2 kB", "12.3 MB", "1.25 GB", "3.40 TB"]
