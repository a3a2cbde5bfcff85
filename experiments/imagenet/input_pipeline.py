"""ImageNet input pipeline with tf.data: parallel JPEG decode, Inception crops, prefetch.

Sources: ``tfds.load('imagenet2012')`` (archives in the tfds manual directory) or
any ImageFolder directory (``<split>/<class>/*.jpg``) in ``config.data_dir``.
Each host reads its own shard (``jax.process_index()`` of ``jax.process_count()``).
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

MEAN_RGB = np.array([0.485, 0.456, 0.406], np.float32) * 255
STDDEV_RGB = np.array([0.229, 0.224, 0.225], np.float32) * 255


def _random_resized_crop(image_bytes, size, seed):
  """Inception-style crop: area in [0.08, 1], aspect ratio in [3/4, 4/3], then flip."""
  shape = tf.io.extract_jpeg_shape(image_bytes)
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, tf.zeros([0, 0, 4], tf.float32), seed=seed, area_range=(0.08, 1.0),
      aspect_ratio_range=(3 / 4, 4 / 3), max_attempts=10, use_image_if_no_bounding_boxes=True)
  y, x, _ = tf.unstack(begin)
  h, w, _ = tf.unstack(crop_size)
  image = tf.io.decode_and_crop_jpeg(image_bytes, tf.stack([y, x, h, w]), channels=3)
  image = tf.image.resize(image, [size, size], method="bicubic")
  return tf.image.stateless_random_flip_left_right(image, seed=seed + 1)


def _center_crop(image_bytes, size, resize):
  """Resize the shorter side to ``resize`` and take the central ``size`` square."""
  image = tf.io.decode_jpeg(image_bytes, channels=3)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = resize / tf.reduce_min(shape)
  new = tf.cast(tf.round(shape * scale), tf.int32)
  image = tf.image.resize(image, new, method="bicubic")
  top, left = (new[0] - size) // 2, (new[1] - size) // 2
  return tf.image.crop_to_bounding_box(image, top, left, size, size)


def _normalize(image):
  return (tf.cast(image, tf.float32) - MEAN_RGB) / STDDEV_RGB


def _source(config, split: str, drop_remainder: bool) -> tf.data.Dataset:
  """This process's shard of ``split``; all examples if not ``drop_remainder``."""
  decoders = {"image": tfds.decode.SkipDecoding()}
  if config.data_dir:  # ImageFolder has no sub-split API: shard the examples instead
    ds = tfds.ImageFolder(config.data_dir).as_dataset(split=split, decoders=decoders,
                                                      shuffle_files=False)
    return ds.shard(jax.process_count(), jax.process_index())
  builder = tfds.builder("imagenet2012", data_dir=config.tfds_data_dir or None)
  shard = tfds.split_for_jax_process(split, drop_remainder=drop_remainder)
  return builder.as_dataset(split=shard, decoders=decoders, shuffle_files=False)


def splits(config) -> dict[str, int]:
  """Examples per split of the source (all hosts)."""
  builder = (tfds.ImageFolder(config.data_dir) if config.data_dir
             else tfds.builder("imagenet2012", data_dir=config.tfds_data_dir or None))
  return {name: info.num_examples for name, info in builder.info.splits.items()}


def train_dataset(config: ml_collections.ConfigDict, local_batch_size: int,
                  start_step: int = 0) -> tf.data.Dataset:
  """Endless, shuffled, augmented batches for this host, from ``start_step`` on."""
  ds = _source(config, "train", drop_remainder=True)
  if config.cache:
    ds = ds.cache()
  ds = ds.repeat().shuffle(config.shuffle_buffer, seed=config.seed + jax.process_index())
  # Batch b of a resumed run equals batch b of an uninterrupted one: skip the raw
  # examples (no decoding) and keep their global index as the augmentation seed.
  ds = ds.enumerate().skip(start_step * local_batch_size)

  def prepare(i, ex):
    seed = tf.stack([tf.cast(config.seed, tf.int64), i])
    image = _random_resized_crop(ex["image"], config.image_size, tf.cast(seed, tf.int32))
    return {"image": _normalize(image), "label": tf.cast(ex["label"], tf.int32)}

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def eval_dataset(config: ml_collections.ConfigDict, split: str,
                 local_batch_size: int) -> tf.data.Dataset:
  """Centre-cropped batches padded to full size; ``mask`` marks real examples.

  Across processes every example is scored once, and every process yields the
  same number of batches (padding with empty ones), as the collectives require.
  """
  ds = _source(config, split, drop_remainder=False)
  per_process = -(-splits(config)[split] // jax.process_count())
  num_batches = -(-per_process // local_batch_size)

  def prepare(ex):
    image = _center_crop(ex["image"], config.image_size, config.resize_size)
    return {"image": _normalize(image), "label": tf.cast(ex["label"], tf.int32),
            "mask": tf.constant(1.0)}

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.padded_batch(local_batch_size)

  def pad(batch):
    n = tf.shape(batch["label"])[0]
    return {k: tf.pad(v, [[0, local_batch_size - n]] + [[0, 0]] * (len(v.shape) - 1))
            for k, v in batch.items()}

  ds = ds.map(pad)
  empty = {k: tf.zeros([local_batch_size, *spec.shape[1:]], spec.dtype)
           for k, spec in ds.element_spec.items()}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(empty).repeat()).take(num_batches)
  return ds.prefetch(tf.data.AUTOTUNE)
