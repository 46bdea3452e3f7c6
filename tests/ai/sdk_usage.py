# The usage an SDK reports, as the partition proxy.llm_usage.TokenUsage uses (each
# token in one count): what tests compare metered counts with.


def openai_counts(input_tokens, output_tokens, input_details, output_details) -> dict:
    """An OpenAI usage block (either format) as the partition TokenUsage uses."""
    cached = input_details.cached_tokens
    reasoning = output_details.reasoning_tokens
    return {"input_tokens": input_tokens - cached, "cached_tokens": cached,
            "output_tokens": output_tokens - reasoning, "reasoning_tokens": reasoning,
            "cache_write_tokens": 0}


def openai_chat_counts(usage) -> dict:
    return openai_counts(usage.prompt_tokens, usage.completion_tokens,
                         usage.prompt_tokens_details, usage.completion_tokens_details)


def openai_responses_counts(usage) -> dict:
    return openai_counts(usage.input_tokens, usage.output_tokens,
                         usage.input_tokens_details, usage.output_tokens_details)


def anthropic_counts(usage) -> dict:
    return {"input_tokens": usage.input_tokens, "cached_tokens": usage.cache_read_input_tokens,
            "output_tokens": usage.output_tokens, "reasoning_tokens": 0,
            "cache_write_tokens": usage.cache_creation_input_tokens}
