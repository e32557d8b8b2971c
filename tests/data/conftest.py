import json
import pickle

import pytest

# Small bilingual conversations: single- and multi-turn, with and without input.
CONVERSATIONS = [
    [{"instruction": "中国的首都是哪里？", "input": "", "output": "中国的首都是北京。"}],
    [{"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."}],
    [{"instruction": "请推荐五本名著。", "input": "", "output": "红楼梦、西游记、水浒传、三国演义、儒林外史。"},
     {"instruction": "哪一本最长？", "input": "", "output": "红楼梦。"}],
    [{"instruction": "Translate to English.", "input": "今天天气很好", "output": "The weather is nice today."}],
    [{"instruction": "机器学习是什么？", "input": "", "output": "机器学习是人工智能的一个分支。"},
     {"instruction": "深度学习呢？", "input": "", "output": "深度学习使用多层神经网络。"},
     {"instruction": "Summarize.", "input": "The quick brown fox jumps over the lazy dog.", "output": "A fox jumps over a dog."}],
    [{"instruction": "def add(a, b):", "input": "", "output": "    return a + b"}],
    [{"instruction": "今天天气很好，我们去公园散步吧。", "input": "", "output": "好的！"}],
]


@pytest.fixture()
def ift_pkl(tmp_path):
    p = tmp_path / "ift_data.pkl"
    p.write_bytes(pickle.dumps(CONVERSATIONS))
    return p


@pytest.fixture()
def ift_jsonl(tmp_path):
    p = tmp_path / "ift_data.jsonl"
    p.write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in CONVERSATIONS) + "\n", encoding="utf-8")
    return p
