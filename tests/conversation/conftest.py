import pytest
from conversation_builders import tiny_memory


@pytest.fixture
def memory():
    return tiny_memory()
