"""The model catalogue from configuration, the OPENAI_API_KEY shortcut, ListModels, and client sharing."""

import json

import grpc
import pytest
from llm_helpers import TEST_KEY, TEST_KEY_VARIABLE, collect, fake_model, make_settings, openai_settings, request, user
from pydantic import SecretStr, ValidationError

from duplex.llm.v1 import llm_pb2
from llm_service.catalogue import ModelEntry
from llm_service.providers import OpenAIModel, OpenAIProvider
from llm_service.providers.openai_provider import DEFAULT_BASE_URL, public_host
from llm_service.server import create_server
from llm_service.settings import LlmSettings
from tests.fake_openai import FakeOpenAI

CATALOGUE = [
    {
        "name": "gpt-4o-mini",
        "base_url": "https://api.example.com/v1/",
        "api_key_env": TEST_KEY_VARIABLE,
        "fallbacks": ["local-demo"],
        "supports_tools": True,
    },
    {"name": "embedder", "upstream_model": "text-embedding-3-small", "supports_embeddings": True},
]


def test_the_catalogue_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DUPLEX_LLM_MODELS", json.dumps(CATALOGUE))

    settings = LlmSettings()

    chat, embedder = settings.catalogue()
    assert (chat.name, chat.base_url, chat.fallbacks, chat.upstream_model) == (
        "gpt-4o-mini",
        "https://api.example.com/v1",
        ("local-demo",),
        "",
    )
    assert (embedder.base_url, embedder.api_key_env, embedder.supports_embeddings) == (DEFAULT_BASE_URL, "", True)
    assert settings.resolved_default_model() == "local-demo"


def test_the_catalogue_can_live_in_a_file(tmp_path):
    path = tmp_path / "models.json"
    path.write_text(json.dumps(CATALOGUE))

    settings = make_settings(llm_models_file=path)

    assert [entry.name for entry in settings.catalogue()] == ["gpt-4o-mini", "embedder"]
    [chat, embedder] = settings.openai_models({TEST_KEY_VARIABLE: TEST_KEY})
    assert chat.api_key.get_secret_value() == TEST_KEY
    assert embedder.upstream_model == "text-embedding-3-small"


def test_an_openai_key_alone_adds_openai_as_the_default_model(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)

    settings = LlmSettings()

    [entry] = settings.catalogue()
    assert (entry.name, entry.base_url, entry.api_key_env) == ("gpt-4o-mini", DEFAULT_BASE_URL, "OPENAI_API_KEY")
    assert settings.resolved_default_model() == "gpt-4o-mini"
    assert TEST_KEY not in repr(settings)


def test_the_openai_shortcut_takes_a_base_url_and_a_model_name(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:11434/v1")
    monkeypatch.setenv("DUPLEX_OPENAI_MODEL", "llama3.2")

    [model] = LlmSettings().openai_models({})

    assert (model.name, model.upstream_model, model.base_url) == ("llama3.2", "llama3.2", "http://127.0.0.1:11434/v1")
    assert model.api_key.get_secret_value() == TEST_KEY


def test_without_a_key_the_demo_stays_the_default():
    settings = make_settings(default_model="")

    assert settings.catalogue() == []
    assert settings.resolved_default_model() == "local-demo"


def test_an_explicit_default_model_wins_over_the_shortcut():
    settings = make_settings(default_model="local-demo", openai_api_key=TEST_KEY)

    assert settings.resolved_default_model() == "local-demo"


def test_a_missing_key_variable_names_the_variable():
    settings = make_settings(llm_models=[{"name": "m", "api_key_env": "DUPLEX_NOT_SET_ANYWHERE"}])

    with pytest.raises(ValueError, match="reads its API key from DUPLEX_NOT_SET_ANYWHERE, which is not set"):
        settings.openai_models({})


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param({"name": "m", "api_key": TEST_KEY}, id="a key pasted into the catalogue"),
        pytest.param({"name": "local-demo"}, id="the demo's name"),
        pytest.param({"name": "m", "base_url": "ftp://example.com"}, id="not http"),
        pytest.param({"name": ""}, id="no name"),
        pytest.param({"name": "m", "provider": "anthropic"}, id="unknown provider"),
    ],
)
def test_invalid_entries_are_refused_without_echoing_them(entry: dict):
    with pytest.raises(ValidationError) as failure:
        ModelEntry.model_validate(entry)

    assert TEST_KEY not in str(failure.value)


def test_a_model_named_twice_is_refused():
    settings = make_settings(llm_models=[{"name": "m"}, {"name": "m"}])

    with pytest.raises(ValueError, match="names m more than once"):
        settings.catalogue()


async def test_a_fallback_to_an_unknown_model_fails_at_startup(fake_openai: FakeOpenAI):
    settings = openai_settings([fake_model(fake_openai, fallbacks=["nope"])])

    with pytest.raises(ValueError, match="falls back to 'nope'"):
        await create_server(settings)


async def test_list_models_shows_the_catalogue_and_the_demo(start_llm, fake_openai: FakeOpenAI):
    models = [
        fake_model(fake_openai, "chat", supports_embeddings=False, description="A chat model."),
        fake_model(fake_openai, "embedder", supports_tools=False),
    ]
    running = await start_llm(openai_settings(models, default_embedding_model="embedder"))

    listing = await running.stub.ListModels(llm_pb2.ListModelsRequest(), timeout=5)

    assert listing.default_model == "chat"
    assert [
        (model.name, model.provider, model.supports_tools, model.supports_embeddings) for model in listing.models
    ] == [
        ("local-demo", "local", True, True),
        ("local-whisper", "local", False, False),
        ("local-piper", "local", False, False),
        ("chat", "openai", True, False),
        ("embedder", "openai", False, True),
    ]
    assert listing.models[3].description == "A chat model."
    assert listing.models[4].description == "upstream-embedder via 127.0.0.1:" + str(fake_openai.port)
    # Embed without a model uses the default embedding model; a model that cannot embed is refused.
    embedded = await running.stub.Embed(llm_pb2.EmbedRequest(inputs=["x"]), timeout=5)
    assert embedded.model == "embedder"


async def test_embed_with_a_model_that_cannot_embed_is_an_invalid_argument(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(openai_settings([fake_model(fake_openai, supports_embeddings=False)]))

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await running.stub.Embed(llm_pb2.EmbedRequest(model="fake-gpt", inputs=["x"]), timeout=5)

    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.details() == "model 'fake-gpt' does not support embeddings"
    assert fake_openai.requests == []


async def test_the_openai_shortcut_serves_requests_without_a_model(start_llm, fake_openai: FakeOpenAI):
    settings = make_settings(
        default_model="", openai_api_key=TEST_KEY, openai_base_url=fake_openai.base_url, openai_model="gpt-test"
    )
    running = await start_llm(settings)

    reply = await collect(running.stub, request(user("Hi")))

    assert reply.started.model == "gpt-test"
    [sent] = fake_openai.requests
    assert (sent.body["model"], sent.headers["Authorization"]) == ("gpt-test", f"Bearer {TEST_KEY}")


def openai_model(name: str, base_url: str, key: str) -> OpenAIModel:
    return OpenAIModel(name=name, upstream_model=name, api_key=SecretStr(key), base_url=base_url)


async def test_models_sharing_a_base_url_and_key_share_one_client():
    provider = OpenAIProvider(
        [
            openai_model("a", "http://127.0.0.1:1/v1", "k1"),
            openai_model("b", "http://127.0.0.1:1/v1", "k1"),
            openai_model("c", "http://127.0.0.1:1/v1", "k2"),
            openai_model("d", "http://127.0.0.1:2/v1", "k1"),
        ]
    )
    assert provider.client_count == 3

    await provider.close()

    assert provider.client_count == 0


def test_descriptions_never_show_credentials_of_a_base_url():
    assert public_host("https://user:secret@llm.example.com:8443/v1") == "llm.example.com:8443"
    assert "secret" not in repr(openai_model("a", "https://x/v1", "secret"))
