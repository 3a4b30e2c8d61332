"""The image writer: make a target hold an image, never writing an unverified byte."""
