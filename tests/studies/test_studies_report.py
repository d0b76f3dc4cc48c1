"""Report pieces: curves read back from a run's metrics."""

from curvopt import studies
from curvopt import train


def test_curves_by_prefix_latest_record_wins(tmp_path):
  writer = train.MetricWriter(str(tmp_path), tensorboard=False)
  writer.write(1, {'s/a': 1.0, 's/b': 2.0, 'loss': 9.0})
  writer.write(2, {'s/a': 3.0})
  writer.write(2, {'s/a': 4.0})  # logged again after a resume
  writer.close()
  assert studies.curves(str(tmp_path), 's/') == {'s/a': ([1, 2], [1.0, 4.0]), 's/b': ([1], [2.0])}
  assert studies.curve(str(tmp_path), 's/a') == ([1, 2], [1.0, 4.0])
