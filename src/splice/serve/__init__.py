"""Serve one base model with many adapters: an adapter pool, a continuous batcher that mixes adapters in one
batch, and an OpenAI-compatible HTTP API (`splice serve BASE --adapters DIR`)."""
from splice.serve.engine import Engine, Request, SamplingParams
from splice.serve.http import ServeLimits, create_app
from splice.serve.thread import ServerThread
from splice.serve.launch import build_app, model_kind
from splice.serve.pool import AdapterPool

__all__ = ["AdapterPool", "Engine", "Request", "SamplingParams", "ServeLimits", "ServerThread", "build_app",
           "create_app", "model_kind"]
