from sitegate.gate import main

main()
